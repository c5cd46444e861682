"""What names a set of tensors wherever its files are: a digest of every tensor's name, dtype, shape and
bytes. Not of the files' bytes: safetensors writes its metadata in an order that changes from run to run,
so the same tensors make different files."""

from __future__ import annotations

import hashlib

import torch


def update_with_tensors(digest, tensors: dict[str, torch.Tensor]) -> None:
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def tensors_digest(tensors: dict[str, torch.Tensor], *headers: bytes) -> str:
    """16 hex digits over `headers` (e.g. an architecture's JSON) and then `tensors`."""
    digest = hashlib.sha256()
    for header in headers:
        digest.update(header)
    update_with_tensors(digest, tensors)
    return digest.hexdigest()[:16]
