"""Broken image files for tests of untrusted inputs."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image


def noise_png(height: int = 200, width: int = 200) -> bytes:
    """An RGBA PNG of noise: 200 x 200 takes three IDAT chunks (Pillow writes 64 KiB each)."""
    rng = np.random.default_rng(1)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").save(out, "PNG")
    return out.getvalue()


def png_chunks(png: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each PNG chunk."""
    chunks, offset = [], 8
    while offset < len(png):
        length, kind = struct.unpack(">I4s", png[offset:offset + 8])
        chunks.append((offset, kind))
        offset += 12 + length
    return chunks


def broken_chunk_png() -> bytes:
    """A PNG whose second IDAT chunk has a broken type: Pillow raises SyntaxError while decoding it."""
    png = bytearray(noise_png())
    second_idat = [offset for offset, kind in png_chunks(bytes(png)) if kind == b"IDAT"][1]
    png[second_idat + 4] = 0x01  # the chunk type: b"\x01DAT"
    return bytes(png)
