"""Manifest rows and files: validation before any model or Ray work."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvray.config.job import RequestDefaults
from kvray.io import manifest as M
from kvray.io.manifest import ManifestError, open_manifest, part_batches
from kvray.requests.manifest import plan_row, scan_ids

DEFAULTS = RequestDefaults()


def plan(**row):
    return plan_row(row, DEFAULTS, "model-v1", (128, 128))


def test_defaults_and_stable_ids():
    first, again = plan(prompt="a car"), plan(prompt="a car")
    assert first.request.width == first.request.height == 128 and first.request.fps == "low"
    assert first.id == again.id and first.video_id == again.video_id and first.request.seed == again.request.seed
    named = plan(prompt="a car", id="x")
    assert named.id == "x" and named.video_id != first.video_id  # another id, another seed, another video
    assert plan(prompt="a car", id="x", seed=named.request.seed).video_id == named.video_id
    other_model = plan_row({"prompt": "a car"}, DEFAULTS, "model-v2", (128, 128))
    assert other_model.video_id != first.video_id


@pytest.mark.parametrize("row, message", [
    ({"prompt": "  "}, "prompt is empty"),
    ({"prompt": 5}, "prompt must be a string"),
    ({"prompt": "a", "width": 100}, "multiple of 64"),
    ({"prompt": "a", "height": 4096}, "between 64 and 2048"),
    ({"prompt": "a", "fps": "fast"}, "fps"),
    ({"prompt": "a", "motion": "normal"}, "motion"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": 1.5}, "seed must be an integer"),
    ({"prompt": "a", "guidance_weight_image": math.nan}, "finite"),
    ({"prompt": "a", "negative_prompt": "blurry"}, "negative_prompt is not supported"),
])
def test_bad_rows_have_their_reason(row, message):
    planned = plan(**row)
    assert planned.request is None and message in planned.error


def test_extreme_motion_and_noise_augmentation_per_row():
    """Options the official pipeline accepts: motion 'extreme' (score 100) and a noise augmentation level.
    The official level (20) leaves a request's id as it was before the option existed."""
    plain = plan(prompt="a", id="r")
    extreme = plan(prompt="a", id="r", motion="extreme", noise_augmentation=50.0)
    assert extreme.request.motion == "extreme" and extreme.request.noise_augmentation == 50
    assert "noise_augmentation" not in plain.request.identity()
    assert plan(prompt="a", id="r", noise_augmentation=20).video_id == plain.video_id != extreme.video_id
    assert "noise_augmentation" in plan(prompt="a", noise_augmentation=1000).error


def test_nulls_take_defaults_and_float_integers_are_integers():
    planned = plan(prompt="a", width=None, height=256.0, seed=7.0, fps=None)
    assert planned.request.width == 128 and planned.request.height == 256 and planned.request.seed == 7


def _write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_manifest_files_and_their_errors(tmp_path):
    good = _write(tmp_path / "a.parquet", prompt=["x"], width=[64])
    assert open_manifest(good).files == [good]
    _write(tmp_path / "b.parquet", prompt=["y"])
    assert len(open_manifest(str(tmp_path)).files) == 2
    with pytest.raises(ManifestError, match="not found"):
        open_manifest(str(tmp_path / "missing.parquet"))
    (tmp_path / "text.parquet").write_text("prompt\nhello\n")
    with pytest.raises(ManifestError, match="text.parquet is not a Parquet file"):
        open_manifest(str(tmp_path / "text.parquet"))
    with pytest.raises(ManifestError, match="no 'prompt' column"):
        open_manifest(_write(tmp_path / "c.parquet.x", text=["x"]))
    with pytest.raises(ManifestError, match="width is string"):
        open_manifest(_write(tmp_path / "d.parquet.x", prompt=["x"], width=["wide"]))


def _rows(manifest):
    return [(position + i, row) for part in manifest.parts for position, batch in part_batches(manifest.fs, part)
            for i, row in enumerate(batch.to_pylist())]


def test_csv_json_lines_and_text_manifests_read_as_one(tmp_path):
    """Files of different formats, and files whose columns differ in types that are each allowed (integer
    ids in one, text ids in another), are one manifest; positions run over the files in name order."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "1.csv").write_text("id,prompt,width\n007,a red car,64\n8,a boat,\n")
    (folder / "2.jsonl").write_text('{"prompt": "a", "scenes": ["a", "b"]}\n{"prompt": "a fox", "id": 9}\n')
    (folder / "3.txt").write_text("a tree in bloom\n\n  \nsnow at night\n")
    _write(folder / "4.parquet", id=[10, 11], prompt=["p", "q"])
    manifest = open_manifest(str(folder))
    assert [M.file_format(f) for f in manifest.files] == ["csv", "jsonl", "text", "parquet"]
    rows = _rows(manifest)
    assert manifest.rows == len(rows) == 8 and [p for p, _ in rows] == list(range(8))
    assert rows[0][1]["id"] == "007" and rows[0][1]["width"] == 64  # text stays text, numbers are numbers
    assert rows[2][1]["scenes"] == ["a", "b"] and rows[3][1]["id"] == 9
    assert [r["prompt"] for _, r in rows[4:6]] == ["a tree in bloom", "snow at night"]  # blank lines skipped
    planned = [plan_row(r, DEFAULTS, "v", (64, 64)) for _, r in rows]
    assert all(p.request is not None for p in planned), [p.error for p in planned]


def test_a_corrupt_file_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ManifestError, match="bad.jsonl cannot be read as jsonl"):
        open_manifest(str(tmp_path / "bad.jsonl"))


def test_large_files_are_planned_in_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "PART_ROWS", 7)
    monkeypatch.setattr(M, "READ_BATCH_ROWS", 3)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(20)]}), path, row_group_size=6)
    manifest = open_manifest(str(path))
    assert [(p.first_row, p.rows) for p in manifest.parts] == [(0, 7), (7, 5), (12, 7), (19, 1)]
    rows = _rows(manifest)
    assert [r["prompt"] for _, r in rows] == [f"p{i}" for i in range(20)] and [p for p, _ in rows] == list(range(20))


def test_ids_given_twice_and_identical_rows_without_ids(tmp_path):
    """Ids given to several rows: every such row is refused. Identical rows without ids: one row (the
    first), rendered once. A manifest that writes a derived-looking id itself gets no special treatment."""
    first = plan(prompt="same").id
    path = _write(tmp_path / "m.parquet", id=["a", None, "b", "a", None, None, first],
                  prompt=["p", "same", "q", "r", "same", "other", "z"])
    scan = scan_ids(open_manifest(path))
    assert scan.rows == 7 and scan.duplicates == {"a": 2, first: 3} and scan.repeats.tolist() == []
    path = _write(tmp_path / "n.parquet", prompt=["same", "x", "same", "same"])
    scan = scan_ids(open_manifest(path))
    assert scan.duplicates == {} and scan.repeats.tolist() == [2, 3]


def test_render_refuses_a_bad_manifest_before_anything_starts(tmp_path, capsys):
    from kvray.cli import main

    out = tmp_path / "out"
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert main(["render", str(tmp_path / "bad.parquet"), "--out", str(out)]) == 2
    assert "not a Parquet file" in capsys.readouterr().err
    assert not out.exists()


def test_prompts_that_repeat_after_normalisation_are_counted(tmp_path):
    path = _write(tmp_path / "m.parquet", prompt=["A red car", "a  red CAR ", "ａ red car", "a boat", "a red car"],
                  seed=[None, None, None, None, 7])
    prompts = scan_ids(open_manifest(path)).prompts
    assert (prompts.distinct, prompts.duplicate_rows) == (3, 2)
    assert prompts.positions.tolist() == [1, 2] and prompts.firsts.tolist() == [0, 0]  # another seed: not a repeat
    assert prompts.most_repeated == ((0, 3),) and "row 0 x3" in prompts.line()
