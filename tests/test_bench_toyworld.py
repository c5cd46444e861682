"""`kvray bench toyworld`'s plumbing without a renderer: its manifest holds the held-out combinations, and
the ground truth, stored as a render stores videos, scores 100% where a wrong video scores less."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvray.bench.toyworld import judge_outputs, toyworld_manifest
from kvray.io.layout import results_dir
from kvray.io.video import encode_video
from kvray.toyworld import Scene, held_out_combos, render, sample_scene
from kvray.toyworld.judge import score


def test_the_manifest_is_the_held_out_combinations_with_image_rows(tmp_path):
    expected = toyworld_manifest(tmp_path, seeds=2, image_rows=3, steps=7, limit=5)
    table = pq.read_table(tmp_path / "prompts.parquet").to_pylist()
    assert len(table) == len(expected) == 2 * 5 + 3
    held = set(held_out_combos())
    assert all(tuple(want["combo"]) in held for want in expected.values())
    images = [row for row in table if row["image"]]
    assert len(images) == 3 and all(row["image"].startswith(str(tmp_path / "images")) for row in images)
    assert {row["steps"] for row in table} == {7} and {row["width"] for row in table} == {64}
    assert len({row["seed"] for row in table}) == len(table)


@pytest.mark.parametrize("wrong", [False, True])
def test_ground_truth_scores_everything_and_a_wrong_video_does_not(tmp_path, wrong):
    expected = toyworld_manifest(tmp_path / "inputs", image_rows=2, limit=4)
    out = tmp_path / "out"
    rng = np.random.default_rng(1)
    rows = []
    for row_id, want in expected.items():
        combo = tuple(want["combo"])
        scene = Scene(**want["scene"]) if want["image"] else sample_scene(rng, combo)
        frames = render(scene, 12, 64)
        if wrong:
            frames = frames[::-1]
        path = out / "videos" / f"{row_id}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_video(frames, 2.2, "mp4"))
        rows.append({"id": row_id, "status": "ok", "uri": str(path), "error": None})
    folder = results_dir(str(out), "20260101T000000-run")
    (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), f"{folder}/part-0.parquet")

    judged, failed = judge_outputs(str(out), expected)
    assert failed == [] and len(judged) == len(expected)
    shares = score(judged)
    if wrong:
        assert shares["motion"] < 0.5 and shares["all"] < 0.5
    else:
        assert shares["all"] == 1.0, judged
