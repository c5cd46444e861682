"""Pixels <-> model tensors, exactly as the official pipeline converts them."""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch._subclasses.fake_tensor import is_fake


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output `b c h w` in [-1, 1] -> uint8 `b h w c`.

    The official code truncates (`astype(uint8)` / `mul(255).byte()`) rather than rounds: kept, so that
    frames match it bit for bit.
    """
    scaled = ((images.float() + 1) / 2).clamp(0, 1) * 255
    pixels = rearrange(scaled.to(torch.uint8), "b c h w -> b h w c").cpu()
    if is_fake(pixels):
        # Under fake tensors (`kvray.sizing.estimate`: shapes without values) there is nothing to copy:
        # black frames of the same shape stand in, so that the images made from them have the real size.
        return np.zeros(tuple(pixels.shape), dtype=np.uint8)
    return pixels.numpy()


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Shrink (never enlarge) until one side fits, then centre-crop to `width x height`, in the image's own mode.

    The official `encode_image`: a smaller image is not upscaled, its crop box reaches past the
    border and Pillow fills the outside with zeros (black; transparent for RGBA; palette entry 0 for P).
    Pillow's default resampling: bicubic, except NEAREST for P and 1 images; RGBA and LA are
    resampled with premultiplied alpha.
    """
    reduce = max(1.0, min(image.width / width, image.height / height))
    resized = image.resize((round(image.width / reduce), round(image.height / reduce)))
    left, top = (resized.width - width) / 2, (resized.height - height) / 2
    return resized.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An image of any mode -> the MoVQ encoder's input `1 3 h w` in [-1, 1].

    In the official order: `cover_crop` in the image's own mode, then RGB (alpha dropped, not
    composited; palette, grey, CMYK and 16-bit values converted by Pillow), then scaled.
    """
    cropped = cover_crop(image, width, height)
    pixels = np.asarray(cropped.convert("RGB"), dtype=np.float32) / 255.0
    return rearrange(torch.from_numpy(pixels) * 2 - 1, "h w c -> 1 c h w")


def decode_chunks(num_frames: int) -> list[int]:
    """Frames per temporal-MoVQ call: the official `video.chunk(T // 4)` (12 -> 4,4,4; 45 -> 5 x 9; 177 -> 5 x 35, 2)."""
    chunks = max(1, num_frames // 4)
    size = -(-num_frames // chunks)
    sizes = [size] * (num_frames // size)
    return sizes + ([num_frames % size] if num_frames % size else [])
