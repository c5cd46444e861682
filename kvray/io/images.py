"""Reading user images (image2video first frames) from a path, URL or fsspec URI."""

from __future__ import annotations

import io

import fsspec
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be read or decoded."""


def load_image(source: str, storage_options: dict | None = None) -> Image.Image:
    """The image at `source` (local path, http(s) URL, s3://, ...) as RGB."""
    try:
        with fsspec.open(source, "rb", **(storage_options or {})) as f:
            data = f.read()
    except (OSError, ValueError, ImportError) as err:
        raise ImageError(f"cannot read image {source!r}: {err}") from err
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ImageError(f"{source!r} is not a readable image: {err}") from err
    return image.convert("RGB")
