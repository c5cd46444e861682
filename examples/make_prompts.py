"""Write the example manifest `examples/prompts.parquet` and its image `examples/images/lighthouse.png`.

    python examples/make_prompts.py

The manifest is what `kvray render` and `kvray submit` read: one row per video. Columns:

    id      string, unique per row; names the row in results/*.parquet
    prompt  string, required (for image2video it describes the motion and the scene)
    seed    int64, null: a random seed, recorded in the result
    fps     string, low (12 frames), medium (45) or high (177); null: the job's default
    motion  string, low, medium or high; null: the job's default
    width   int64, a multiple of 64; null: the job's default, else the preset's (128 tiny, 512 kv11)
    height  int64, as width
    image   string, image2video: path, URL or fsspec URI of the first frame; null: text2video

Relative image paths are relative to the working directory of the render (the repository root
locally, and the job's working_dir under `kvray submit`, which ships this folder). Both files are
kept in the repository; re-running this script rewrites them identically.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
IMAGE = "examples/images/lighthouse.png"  # relative to the repository root

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("fps", pa.string()),
    ("motion", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("image", pa.string()),
])

ROWS = [
    dict(id="red-car", prompt="a red car drifting on a mountain road at sunset", seed=1),
    dict(id="jellyfish", prompt="glowing jellyfish drifting in the deep ocean", seed=2, motion="low"),
    dict(id="city-rain", prompt="a neon city street in the rain, night, reflections", fps="medium"),
    dict(id="fox-snow", prompt="a fox running through fresh snow in a pine forest", seed=4, motion="high"),
    dict(id="tea-steam", prompt="steam rising from a cup of green tea, close-up", seed=5, width=256, height=192),
    dict(id="lighthouse", prompt="waves crashing below a lighthouse, clouds moving", seed=6, image=IMAGE),
]


def make_image(path: Path, size: int = 256) -> None:
    """A small synthetic scene: sky, sun, sea, a cliff and a lighthouse. Flat colours keep the PNG small."""
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    horizon = int(size * 0.6)
    for y in range(horizon):  # sky: a vertical gradient (PNG's Up filter makes it nearly free)
        t = y / horizon
        draw.line([(0, y), (size, y)], fill=(int(90 + 120 * t), int(150 + 70 * t), int(230 - 20 * t)))
    for y in range(horizon, size):  # sea
        t = (y - horizon) / (size - horizon)
        draw.line([(0, y), (size, y)], fill=(int(20 + 20 * t), int(90 - 30 * t), int(150 - 50 * t)))
    s = size / 256
    draw.ellipse([200 * s, 30 * s, 236 * s, 66 * s], fill=(255, 236, 160))  # sun
    draw.polygon([(0, 120 * s), (70 * s, 130 * s), (110 * s, 160 * s), (130 * s, size), (0, size)], fill=(70, 60, 50))
    draw.rectangle([40 * s, 60 * s, 60 * s, 125 * s], fill=(235, 235, 230))  # tower
    for y in (75, 100):
        draw.rectangle([40 * s, y * s, 60 * s, (y + 8) * s], fill=(200, 40, 40))  # stripes
    draw.rectangle([37 * s, 50 * s, 63 * s, 60 * s], fill=(40, 40, 40))  # lamp room
    draw.polygon([(35 * s, 50 * s), (50 * s, 38 * s), (65 * s, 50 * s)], fill=(200, 40, 40))  # roof
    for y in range(horizon + 6, size, 14):  # wave crests
        draw.line([(110 * s + (y % 28), y), (size - 10, y)], fill=(180, 210, 230), width=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def make_manifest(path: Path) -> pa.Table:
    columns = {name: [row.get(name) for row in ROWS] for name in SCHEMA.names}
    table = pa.table(columns, schema=SCHEMA)
    pq.write_table(table, path)
    return table


def main() -> None:
    root = HERE.parent
    make_image(root / IMAGE)
    table = make_manifest(HERE / "prompts.parquet")
    print(f"wrote {HERE / 'prompts.parquet'} ({table.num_rows} rows) and {root / IMAGE}")


if __name__ == "__main__":
    main()
