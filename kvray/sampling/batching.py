"""Building U-Net batches for R requests: text conditions, guidance branches, per-request values.

Batch layout. For one request the U-Net batch is exactly the official one: a block of B guidance
branches x K samples (first frame: 2 x 1; keyframes: 3 x F frames; interpolation: 2 x G groups).
Requests are concatenated block after block ("request-major"). The U-Nets' temporal layers treat every
K consecutive samples as one clip (`(b t)` with t = F frames, or t = G groups for the interpolation
U-Net), so every clip stays one request's branch.

Text contexts of different lengths are zero-padded (mask 0) to the longest one of the batch, and the
U-Net then gets `context_lengths` (each sample's own length): the official U-Nets pool the text with
the mean over ALL context positions of the prompt's own (cut) context, so the mean must divide by that
length, not by the padded one (`AttentionPolling`). Attention gives padded positions exactly zero
weight. A request therefore goes through the same computation alone or in any batch, up to the
rounding of batched kernels, which the samplers amplify: batch invariance comes from giving each
request its own calls (`RuntimeConfig.batch_invariant`), not from this layout. `context_lengths` is
passed only when lengths differ, so a batch of equal lengths (and every official replay) calls the
U-Net exactly as the official loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import repeat

from .noise import NoiseSource

LATENT_CHANNELS = 4


@dataclass(frozen=True)
class TextCondition:
    """One request's encoded prompt: `context` (L, D) and `mask` (L,) (nonzero = attended)."""

    context: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if self.context.dim() != 2 or self.mask.dim() != 1 or self.mask.shape[0] != self.context.shape[0]:
            raise ValueError(
                f"TextCondition wants context (L, D) and mask (L,), got {tuple(self.context.shape)} and {tuple(self.mask.shape)}"
            )

    @classmethod
    def from_batch(cls, context: torch.Tensor, mask: torch.Tensor, lengths=None) -> list[TextCondition]:
        """Splits an encoder output (B, L, D), (B, L). With `lengths` (each prompt's own context length,
        as the official encoder cuts a single prompt: real tokens + 1), each row is cut to it; without,
        every request keeps the batch's padded length, which changes the U-Nets' text pooling."""
        if lengths is None:
            return [cls(c, m) for c, m in zip(context, mask)]
        return [cls(c[: int(n)], m[: int(n)]) for c, m, n in zip(context, mask, lengths)]

    def to(self, device) -> TextCondition:
        return TextCondition(self.context.to(device), self.mask.to(device))

    @property
    def length(self) -> int:
        return self.context.shape[0]

    def unconditional(self, null_embedding: torch.Tensor) -> TextCondition:
        """The official `_get_unconditional_context`: zeros with the learnt null token at position 0."""
        context = torch.zeros_like(self.context)
        mask = torch.zeros_like(self.mask)
        context[0] = null_embedding
        mask[0] = 1
        return TextCondition(context, mask)

    def padded(self, length: int) -> TextCondition:
        """Zero context rows and mask 0 appended up to `length`."""
        extra = length - self.length
        if extra == 0:
            return self
        return TextCondition(F.pad(self.context, (0, 0, 0, extra)), F.pad(self.mask, (0, extra)))


def per_request(value, count: int, what: str) -> list:
    """A value for every request: one value is shared, a sequence must have one per request."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{len(value)} {what} for {count} requests")
        return list(value)
    return [value] * count


def check_noise(noise: NoiseSource, count: int) -> None:
    if count == 0:
        raise ValueError("no requests")
    if noise.num_requests != count:
        raise ValueError(f"the noise source serves {noise.num_requests} requests, the batch has {count}")


def null_embedding_of(denoiser, null_embedding: torch.Tensor | None) -> torch.Tensor:
    if null_embedding is None:
        null_embedding = getattr(denoiser, "null_embedding", None)
    if null_embedding is None:
        raise ValueError("pass null_embedding: the denoiser has no `null_embedding` attribute")
    return null_embedding.reshape(-1)


def stack_latents(latents) -> torch.Tensor:
    stacked = latents if isinstance(latents, torch.Tensor) else torch.stack(list(latents))
    return stacked.to(torch.float32)


def model_dtype_of(denoiser, texts: Sequence[TextCondition], model_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the U-Net inputs (x, contexts, float time): given, else the denoiser's floating
    parameters' (an `nn.Module`), else the contexts' (the official loops cast to the context dtype)."""
    if model_dtype is not None:
        return model_dtype
    if isinstance(denoiser, torch.nn.Module):
        for param in denoiser.parameters():
            if param.is_floating_point():
                return param.dtype
    return texts[0].context.dtype


def branch_inputs(texts: Sequence[TextCondition], null: torch.Tensor, branches: str, k: int,
                  dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Per request: the contexts of its B = len(branches) guidance branches ('c' text, 'u' null), each
    repeated for the k samples of the branch: context (B*k, L, D), bool mask (B*k, L), and, when the
    requests' lengths differ, context_lengths (B*k,) of the unpadded length. Contexts are padded to the
    longest of the batch."""
    longest = max(text.length for text in texts)
    mixed = any(text.length != longest for text in texts)
    out = []
    for text in texts:
        uncond = text.unconditional(null)
        chosen = [(text if b == "c" else uncond).padded(longest) for b in branches]
        block = {
            "context": torch.cat([repeat(c.context, "l d -> k l d", k=k) for c in chosen]).to(dtype),
            "context_mask": torch.cat([repeat(c.mask, "l -> k l", k=k) for c in chosen]).bool(),
        }
        if mixed:
            # The unconditional context has the request's length too (official: zeros_like(context)).
            block["context_lengths"] = torch.full((len(branches) * k,), text.length, dtype=torch.int64,
                                                  device=text.context.device)
        out.append(block)
    return out


def concat_blocks(blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The per-request loop-constant inputs as one U-Net batch, request after request."""
    return {name: torch.cat([block[name] for block in blocks]) for name in blocks[0]}


def context_args(static: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"context_lengths": static["context_lengths"]} if "context_lengths" in static else {}
