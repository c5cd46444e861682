"""The Ray renderer end to end at tiny size: S3 on loopback, 8 logical GPUs, valid and invalid rows."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from kvray.config.job import RenderJob
from kvray.io.video import read_video

pytestmark = pytest.mark.slow

ROWS = [
    # id, prompt, fps, width, height, motion; expected frames or the error it must give
    ("car", "a red car drifting on a mountain road", "medium", 128, 64, "high", 45),
    ("lake", "snow falling on a quiet lake", "low", 64, 64, None, 12),
    ("tower", "a lighthouse at night", None, 64, 128, "low", 12),
    ("empty", "   ", "low", 64, 64, None, "prompt is empty"),
    ("wide", "a field", "low", 100, 64, None, "multiple of 64"),
    ("fast", "a train", "fastest", 64, 64, None, "fps"),
    ("wild", "a river", "low", 64, 64, "wild", "motion"),
]
DEPLOYMENT = {
    "text": {"actors": 1, "gpus": 1, "batch_size": 4},
    "keyframes": {"actors": 2, "gpus": 1, "batch_size": 1},
    "interpolate": {"actors": 1, "gpus": 1, "batch_size": 2},
    "decode": {"actors": 1, "gpus": 2, "batch_size": 1},
}


@pytest.fixture
def manifest_job(s3_bucket):
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    table = pa.table({
        "id": [r[0] for r in ROWS], "prompt": [r[1] for r in ROWS], "fps": [r[2] for r in ROWS],
        "width": [r[3] for r in ROWS], "height": [r[4] for r in ROWS], "motion": [r[5] for r in ROWS],
        "steps": [2] * len(ROWS), "interpolation_steps": [2] * len(ROWS),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    fs.pipe(f"{s3_bucket.name}/in/prompts.parquet", sink.getvalue())
    job = RenderJob(
        manifest=f"s3://{s3_bucket.name}/in/prompts.parquet", out=f"s3://{s3_bucket.name}/out",
        storage_options=s3_bucket.storage_options, deployment=DEPLOYMENT,
    )
    return fs, job


def _results(fs, bucket, run_id) -> dict:
    """One run's result rows, by id (each id exactly once)."""
    rows = {}
    for path in fs.glob(f"{bucket}/out/results/{run_id}/*.parquet"):
        for row in pq.read_table(io.BytesIO(fs.cat(path))).to_pylist():
            assert row["id"] not in rows, f"{row['id']} appears twice in the results"
            rows[row["id"]] = row
    return rows


def test_render_to_s3_then_resume(ray_cluster, s3_bucket, manifest_job, monkeypatch):
    from kvray.distributed.render import render

    fs, job = manifest_job
    summary = render(job)
    assert (summary.ok, summary.error, summary.skipped) == (3, 4, 0) and summary.exit_code == 1
    results = _results(fs, s3_bucket.name, summary.run_id)
    assert set(results) == {r[0] for r in ROWS}
    for row_id, prompt, _fps, width, height, _motion, expected in ROWS:
        row = results[row_id]
        if isinstance(expected, str):
            assert row["status"] == "error" and expected in row["error"], row
            continue
        assert row["status"] == "ok", row
        frames, _ = read_video(fs.cat(row["uri"]))
        assert frames.shape == (expected, height, width, 3)
        # Keys spread over prefixes: videos/ab/abcd....mp4, meta/ab/abcd....json.
        assert row["uri"].endswith(f"/out/videos/{row['video_id'][:2]}/{row['video_id']}.mp4")
        meta = json.loads(fs.cat(f"{s3_bucket.name}/out/meta/{row['video_id'][:2]}/{row['video_id']}.json"))
        assert meta["id"] == row_id and meta["frames"] == expected and meta["seed"] == row["seed"]
        assert set(meta["placement"]) == {"text", "keyframes", "interpolate", "decode"}
        assert meta["resolved"]["steps"] == 2 and row["prompt"] == prompt
        assert meta["placement"]["keyframes"]["stack"]["threads"] >= 1
        # Poster and preview next to the video, and content types a browser plays inline.
        spread = f"{row['video_id'][:2]}/{row['video_id']}"
        assert fs.info(row["uri"])["ContentType"] == "video/mp4"
        assert fs.info(f"{s3_bucket.name}/out/posters/{spread}.jpg")["ContentType"] == "image/jpeg"
        assert fs.info(f"{s3_bucket.name}/out/previews/{spread}.webp")["ContentType"] == "image/webp"
    # Each stage's actors held their own GPUs, as many as configured.
    actors = summary.stages["actors"]
    held = {stage: [g for a in actors[stage] for g in a["gpu_ids"]] for stage in DEPLOYMENT}
    for stage, spec in DEPLOYMENT.items():
        assert len(actors[stage]) == spec["actors"]
        assert len(held[stage]) == spec["actors"] * spec["gpus"]
    every = [g for ids in held.values() for g in ids]
    assert len(every) == len(set(every)) == 6
    run = json.loads(fs.cat(f"{s3_bucket.name}/out/run.json"))
    assert run["status"] == "finished" and run["latest"] == summary.run_id
    assert run["summary"]["stages"]["actors"] == actors
    assert json.loads(fs.cat(f"{s3_bucket.name}/out/runs/{summary.run_id}.json"))["status"] == "finished"
    assert s3_bucket.storage_options["secret"] not in json.dumps(run)

    def no_ray(*args, **kwargs):
        raise AssertionError("a run with nothing to render must not need Ray")

    monkeypatch.setattr("kvray.distributed.render.connect", no_ray)
    again = render(job)
    assert (again.ok, again.error, again.skipped) == (0, 4, 3)
    assert not again.stages.get("model_calls") and not again.stages.get("actors")  # no model was even loaded
    rerun = _results(fs, s3_bucket.name, again.run_id)
    statuses = {k: r["status"] for k, r in rerun.items() if r["status"] != "error"}
    assert statuses == {"car": "skipped", "lake": "skipped", "tower": "skipped"}
    assert all(rerun[k]["uri"] == results[k]["uri"] for k in ("car", "lake", "tower"))
    # Each run is kept; the latest status of every row is one row per id.
    from kvray.io.layout import latest_results

    latest = latest_results(fs, f"{s3_bucket.name}/out").to_pylist()
    assert sorted(r["id"] for r in latest) == sorted(r[0] for r in ROWS)
    # A skip gives way to the outcome of the run that made the video.
    assert {r["id"]: (r["status"], r["run"]) for r in latest}["car"] == ("ok", summary.run_id)


def test_render_sizes_the_pools_with_the_planner(ray_cluster, tmp_path):
    """A job that fixes no pool is planned for the cluster's 8 GPUs: with 30 GiB per actor on 40 GiB GPUs,
    every actor holds a whole GPU of its own, as the plan in the run record says. An actor that needs more
    than one GPU holds is refused before anything starts."""
    from kvray.distributed.planner import DoesNotFit
    from kvray.distributed.render import render

    pq.write_table(pa.table({"prompt": ["a red car", "a quiet lake"], "steps": [2, 2], "width": [64, 64],
                             "height": [64, 64]}), tmp_path / "m.parquet")
    too_big = RenderJob(manifest=str(tmp_path / "m.parquet"), out=str(tmp_path / "big"), gpu_memory_gib=80,
                        costs="text=1@150,keyframes=1@30,interpolate=1@30,decode=1@30")
    with pytest.raises(DoesNotFit, match="one text actor needs 150.5 GiB"):
        render(too_big)
    assert not (tmp_path / "big").exists()
    job = RenderJob(manifest=str(tmp_path / "m.parquet"), out=str(tmp_path / "out"), gpu_memory_gib=40,
                    costs="text=0.2@30,keyframes=1@30,interpolate=0.4@30,decode=0.6@30")
    summary = render(job)
    assert summary.ok == 2
    plan = json.loads((tmp_path / "out" / "run.json").read_text())["plan"]
    started = summary.stages["actors"]
    for stage, planned in plan["stages"].items():
        assert planned["gpus_per_actor"] == 1.0 and len(started[stage]) == planned["actors"] >= 1
        assert all(len(actor["gpu_ids"]) == 1 for actor in started[stage])
    held = [g for actors in started.values() for actor in actors for g in actor["gpu_ids"]]
    assert len(held) == len(set(held)) <= 8
