"""Manifest rows and files: validation before any model or Ray work."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvray.config.job import RequestDefaults
from kvray.io.manifest import ManifestError, manifest_files
from kvray.requests.manifest import plan_row

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
    assert manifest_files(good)[1] == [good]
    _write(tmp_path / "b.parquet", prompt=["y"])
    assert len(manifest_files(str(tmp_path))[1]) == 2
    with pytest.raises(ManifestError, match="not found"):
        manifest_files(str(tmp_path / "missing.parquet"))
    (tmp_path / "text.parquet").write_text("prompt\nhello\n")
    with pytest.raises(ManifestError, match="not a Parquet file"):
        manifest_files(str(tmp_path / "text.parquet"))
    with pytest.raises(ManifestError, match="no 'prompt' column"):
        manifest_files(_write(tmp_path / "c.parquet.x", text=["x"]))
    with pytest.raises(ManifestError, match="width is string"):
        manifest_files(_write(tmp_path / "d.parquet.x", prompt=["x"], width=["wide"]))


def test_render_refuses_a_bad_manifest_before_anything_starts(tmp_path, capsys):
    from kvray.cli import main

    out = tmp_path / "out"
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert main(["render", str(tmp_path / "bad.parquet"), "--out", str(out)]) == 2
    assert "not a Parquet file" in capsys.readouterr().err
    assert not out.exists()
