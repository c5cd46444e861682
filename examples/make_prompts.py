"""Write the example manifest `examples/prompts.parquet` and its image `examples/images/shapes.png`.

    python examples/make_prompts.py

The manifest is what `kvray render` and `kvray submit` read: one row per video. Its rows are in the
toy world that the embedded default model was trained on (`kvray.toyworld`: one coloured circle,
square or triangle moving on a black, white or gray background), so the default model renders them
as the prompts say. Columns:

    id      string, unique per row; names the row in results/*.parquet
    prompt  string (for image2video it describes the motion; null when `scenes` is given)
    seed    int64, null: derived from the row, recorded in the result
    fps     string, low (12 frames), medium (45) or high (177); null: the job's default
    motion  string, low, medium, high or extreme; null: the job's default
    image   string, image2video: path, URL or fsspec URI of the first frame; null: text2video
    mode    string, text2video / image2video / animation; null: from `image`
    camera  string, animation: a camera effect
    scenes  list of strings, a mini-movie: every scene's prompt

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
IMAGE = "examples/images/shapes.png"  # relative to the repository root

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("fps", pa.string()),
    ("motion", pa.string()),
    ("image", pa.string()),
    ("mode", pa.string()),
    ("camera", pa.string()),
    ("scenes", pa.list_(pa.string())),
])

ROWS = [
    dict(id="red-circle", prompt="a red circle moves right on a black background", seed=1, fps="low"),
    dict(id="blue-square", prompt="a blue square moves up on a white background", seed=2, fps="medium"),
    dict(id="yellow-triangle", prompt="a yellow triangle grows on a gray background", seed=3, fps="high"),
    # image2video: a hand-drawn image the model never saw; the prompt says how its shape moves.
    dict(id="drawn-circle", prompt="a green circle moves left on a black background", seed=4, fps="medium", image=IMAGE),
    dict(id="zoom", prompt="a purple square stays still on a white background", seed=5, mode="animation",
         camera="zoom-in"),
    dict(id="movie", seed=6, fps="low", scenes=["a white circle moves right on a gray background",
                                                  "a white circle moves down on a gray background",
                                                  "a white circle shrinks on a gray background"]),
]


def make_image(path: Path, size: int = 128) -> None:
    """A green disc right of centre on black, drawn with Pillow (not by the toy world's renderer)."""
    img = Image.new("RGB", (size, size), (12, 12, 12))
    draw = ImageDraw.Draw(img)
    cx, cy, r = 0.66 * size, 0.45 * size, 0.14 * size
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(50, 185, 70))
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
