"""User images: every mode resized and cropped as the official code does, and every decoding error one ImageError."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from kvray.config.images import ImagePolicy
from kvray.io.images import ImageError, load_image
from kvray.pipeline.frames import cover_crop, image_to_tensor

from .bad_images import broken_chunk_png

SIZES = [(64, 64), (128, 64)]


def official_encode_input(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The official `encode_image` up to the MoVQ, in its order of Pillow operations: resize (Pillow's
    default filter) and centre-crop in the image's own mode, RGB last (only when not RGB already), then
    torchvision's ToTensor (uint8 / 255) and 2x - 1."""
    reduce_factor = max(1, min(image.size[0] / width, image.size[1] / height))
    image = image.resize((round(image.size[0] / reduce_factor), round(image.size[1] / reduce_factor)))
    w, h = image.size
    image = image.crop(((w - width) / 2, (h - height) / 2, (w + width) / 2, (h + height) / 2))
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return (2 * pixels - 1)[None]


def old_order(image: Image.Image, width: int, height: int) -> np.ndarray:
    """What kvray did before: RGB first, then resize and crop."""
    return np.asarray(cover_crop(image.convert("RGB"), width, height))


def _pixels(tensor: torch.Tensor) -> np.ndarray:
    return ((tensor[0].permute(1, 2, 0) + 1) / 2 * 255).round().to(torch.uint8).numpy()


def _picture(rng, height: int, width: int) -> np.ndarray:
    """Smooth gradients with noise, so that resampling filters matter."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def _palette_image(rng, rgb: np.ndarray) -> Image.Image:
    """48 colours; entry 0, which fills the crop outside a small image, is not black."""
    image = Image.fromarray(rgb).quantize(48)
    palette = rng.integers(32, 256, (256, 3), dtype=np.uint8)
    palette[:48] = np.asarray(image.getpalette()[:144], np.uint8).reshape(48, 3)
    palette[0] = (200, 40, 40)
    image.putpalette(palette.reshape(-1).tolist())
    return image


def _images(height: int, width: int) -> dict[str, tuple[Image.Image, str]]:
    """One image per mode, with the format that stores it losslessly."""
    rng = np.random.default_rng(height * 1000 + width)
    rgb = _picture(rng, height, width)
    alpha = np.full((height, width, 1), 128, np.uint8)  # half transparent, with opaque and clear bands
    alpha[:, : width // 6], alpha[:, -width // 6:] = 255, 0
    cmyk = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    deep = (rgb[..., 0].astype(np.uint16) * 257 + rng.integers(0, 257, (height, width))).astype(np.uint16)
    return {
        "RGBA": (Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA"), "PNG"),
        "P": (_palette_image(rng, rgb), "PNG"),
        "L": (Image.fromarray(rgb).convert("L"), "PNG"),
        "CMYK": (Image.fromarray(cmyk, "CMYK"), "TIFF"),
        "I;16": (Image.fromarray(deep), "PNG"),  # 16-bit grey, all of 0..65535
        "I;16 low": (Image.fromarray(deep // 300), "PNG"),  # 16-bit values a uint8 could hold
        "RGB": (Image.fromarray(rgb), "PNG"),
    }


@pytest.mark.parametrize("source_size", [(110, 150), (30, 40), (50, 300)], ids=["larger", "smaller", "wide"])
def test_every_mode_in_the_official_order(tmp_path, source_size):
    """Loaded in its own mode; resized and cropped in it, RGB last: the official pixels exactly."""
    differs = {}
    for name, (image, fmt) in _images(*source_size).items():
        path = tmp_path / f"{name.replace(';', '_').replace(' ', '_')}.{fmt.lower()}"
        image.save(path, fmt)
        loaded = load_image(str(path), policy=ImagePolicy(prefixes=[str(tmp_path)]))
        assert loaded.mode == image.mode, name  # no conversion on load
        assert np.array_equal(np.asarray(loaded), np.asarray(image)), name
        for width, height in SIZES:
            got = image_to_tensor(loaded, width, height)
            want = official_encode_input(Image.open(path), width, height)
            assert got.shape == (1, 3, height, width) and got.dtype == torch.float32
            assert torch.equal(got, want), (name, width, height)
            diff = np.abs(old_order(loaded, width, height).astype(int) - _pixels(want).astype(int)).max()
            differs[name] = max(differs.get(name, 0), int(diff))
    # The old order (RGB first) gave other pixels: colours resampled instead of palette indices (P:
    # NEAREST) and, where a small image's crop reaches past its border, black instead of palette entry
    # 0 (P) or of CMYK zero, white; RGBA resized with premultiplied alpha (its clear band turns black),
    # CMYK resampled before its nonlinear conversion.
    assert differs["P"] > 8 and differs["CMYK"] > 8, differs
    if source_size == (110, 150):  # the one size that is resized (shrunk) for both targets
        assert differs["RGBA"] > 8, differs
    assert differs["RGB"] == 0 and differs["L"] == 0, differs


def test_user_image_without_policy_keeps_its_mode(tmp_path):
    image, _ = _images(40, 50)["P"]
    image.save(tmp_path / "p.png")
    loaded = load_image(str(tmp_path / "p.png"))  # the user's own file: no policy
    assert loaded.mode == "P" and loaded.size == (50, 40)


def _load(tmp_path, data: bytes, name="x.png", **policy):
    (tmp_path / name).write_bytes(data)
    return load_image(str(tmp_path / name), policy=ImagePolicy(prefixes=[str(tmp_path)], **policy))


def test_broken_png_chunk_is_an_image_error(tmp_path):
    """The fuzzed PNG of the report: a broken chunk after the first IDAT makes Pillow raise SyntaxError."""
    png = broken_chunk_png()
    with pytest.raises(SyntaxError):
        Image.open(io.BytesIO(png)).load()
    with pytest.raises(ImageError, match="not a readable image.*SyntaxError"):
        _load(tmp_path, png)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_fuzzed_images_give_image_error_or_an_image(tmp_path, fmt):
    """Truncated and bit-flipped files: an ImageError (a ValueError), or an image; never another exception."""
    rng = np.random.default_rng(2)
    out = io.BytesIO()
    Image.fromarray(_picture(rng, 48, 64)).save(out, fmt)
    original = out.getvalue()
    outcomes = set()
    for seed in range(40):
        r = random.Random(seed)
        data = bytearray(original[: r.randrange(1, len(original))] if seed % 2 else original)
        for _ in range(r.randint(0 if seed % 2 else 1, 6)):
            data[r.randrange(len(data))] ^= 1 << r.randrange(8)
        try:
            image = _load(tmp_path, bytes(data), f"fuzz.{fmt.lower()}")
            image_to_tensor(image, 64, 64)  # what decoded also goes through the pipeline's conversion
            outcomes.add("image")
        except ImageError as err:
            assert "fuzz" in str(err)  # names the source
            outcomes.add("error")
    assert "error" in outcomes


def test_header_size_checked_before_decoding(tmp_path):
    """A PNG whose header claims 30000 x 30000 (and one within Pillow's own limit but over the job's)."""
    def claimed(width, height) -> bytes:
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        ihdr = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
        idat = zlib.compress(b"\x00" * 64)  # far too little data: decoding it would fail differently
        return (b"\x89PNG\r\n\x1a\n" + ihdr + struct.pack(">I", len(idat)) + b"IDAT" + idat
                + struct.pack(">I", zlib.crc32(b"IDAT" + idat)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    with pytest.raises(ImageError, match="too large|max_pixels"):
        _load(tmp_path, claimed(30000, 30000))
    with pytest.raises(ImageError, match="4000 x 4000 pixels, more than images.max_pixels"):
        _load(tmp_path, claimed(4000, 4000), max_pixels=10_000_000)
    with pytest.raises(ImageError, match="not a readable image"):  # within the limit: decoded, and truncated
        _load(tmp_path, claimed(4000, 4000))


def test_formats_outside_the_policy_are_refused(tmp_path):
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PCX")
    with pytest.raises(ImageError, match="not a readable image"):
        _load(tmp_path, out.getvalue(), "x.pcx")
    assert _load(tmp_path, out.getvalue(), "x.pcx", formats=["PCX"]).size == (8, 8)
    with pytest.raises(ValueError, match="Pillow cannot open"):
        ImagePolicy(formats=["NOPE"])
