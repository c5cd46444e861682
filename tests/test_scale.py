"""Renders of large manifests at small N: planning streams, done videos are found by listing (never a
request per row), keys are spread over prefixes, dry runs write nothing, --limit, old layouts."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from kvray.bench.fault_proxy import FaultyProxy
from kvray.config.job import RenderJob
from kvray.io import layout as L
from kvray.io.atomic import write_json
from kvray.io.manifest import open_manifest
from kvray.io.opening import open_fs
from kvray.requests.manifest import plan_row

FAST = {"width": 64, "height": 64, "steps": 2, "interpolation_steps": 2}


def _manifest(path, rows: list[dict]) -> str:
    columns = sorted({k for r in rows for k in r})
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return str(path)


def _mark_done(fs, root, video_ids):
    """Commit records written by hand, as the benchmark does: the video counts as done."""
    for video_id in video_ids:
        write_json(fs, L.meta_path(root, video_id), {"video_id": video_id})


def _ids(n):
    return [f"{i:032x}" for i in range(n)]


def test_keys_spread_over_prefixes():
    video_id = "ab" + "0" * 30
    assert L.video_path("root", video_id, "mp4") == f"root/videos/ab/{video_id}.mp4"
    assert L.meta_path("root", video_id) == f"root/meta/ab/{video_id}.json"


@pytest.mark.parametrize("count", [0, 40, 3000])
def test_done_videos_are_found_by_listing_local(tmp_path, count):
    fs, root = open_fs(str(tmp_path / "out"))
    rng = np.random.default_rng(0)
    ids = sorted({rng.bytes(16).hex() for _ in range(count)})
    _mark_done(fs, root, ids)
    (tmp_path / "out" / "meta" / "00").mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / "meta" / "00" / ".x.json.1234.tmp").write_text("{}")  # a killed writer's temporary
    done = L.done_video_ids(fs, root)
    assert done.tolist() == [i.encode() for i in ids]
    assert L.is_done(done, ids[:3] + ["f" * 32]).tolist() == [True] * min(3, count) + [False]


def test_the_benchmarks_manifest_and_done_videos_go_into_a_fresh_local_folder(tmp_path):
    from kvray.bench.scale import make_manifest, mark_done

    fs, root = open_fs(str(tmp_path / "new" / "run"))
    make_manifest(fs, f"{root}/manifest.parquet", 10)
    job = RenderJob(manifest=f"{root}/manifest.parquet", out=f"{root}/out")
    assert mark_done(fs, f"{root}/out", job, 10, 0.5) == 5
    assert open_manifest(job.manifest).rows == 10 and len(L.done_video_ids(fs, f"{root}/out")) == 5


def test_done_videos_on_s3_cost_about_one_request_per_thousand(s3_bucket):
    """The done check lists meta/ (one request per 1,000 keys, at most 17 more), never one per row."""
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    root = f"{s3_bucket.name}/out"
    ids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(2500)]
    fs.pipe({L.meta_path(root, v): b"{}" for v in ids})  # straight to the server, not through the counter
    with FaultyProxy(s3_bucket.endpoint_url, fault_rate=0.0) as proxy:
        options = {**s3_bucket.storage_options, "client_kwargs": {"endpoint_url": proxy.url}}
        counted, counted_root = open_fs(f"s3://{root}", {**options, "skip_instance_cache": True})
        done = L.done_video_ids(counted, counted_root)
    assert len(done) == len(ids)
    assert proxy.requests <= 17 + len(ids) // 1000 + 1, proxy.requests


def test_old_layout_is_refused_then_migrated(tmp_path):
    fs, root = open_fs(str(tmp_path / "out"))
    video_id = "c" * 32
    (tmp_path / "out" / "videos").mkdir(parents=True)
    (tmp_path / "out" / "videos" / f"{video_id}.mp4").write_bytes(b"video")
    write_json(fs, f"{root}/meta/{video_id}.json", {"video_id": video_id, "format": "mp4",
                                                     "uri": f"file://{root}/videos/{video_id}.mp4"})
    pq.write_table(pa.table({"id": ["a"], "video_id": [video_id], "status": ["ok"],
                             "uri": [f"file://{root}/videos/{video_id}.mp4"]}), tmp_path / "out" / "results.parquet")
    (tmp_path / "out" / "results").mkdir()
    (tmp_path / "out" / "results.parquet").rename(tmp_path / "out" / "results" / "old-00000.parquet")
    with pytest.raises(L.LegacyLayout, match="kvray migrate"):
        L.done_video_ids(fs, root)
    assert L.migrate_legacy(fs, root) == {"videos": 1, "meta": 1, "results": 1}
    assert L.migrate_legacy(fs, root) == {"videos": 0, "meta": 0, "results": 0}  # idempotent
    assert L.done_video_ids(fs, root).tolist() == [video_id.encode()]
    assert (tmp_path / "out" / "videos" / "cc" / f"{video_id}.mp4").read_bytes() == b"video"
    meta = json.loads((tmp_path / "out" / "meta" / "cc" / f"{video_id}.json").read_text())
    assert meta["uri"].endswith(f"videos/cc/{video_id}.mp4")
    latest = L.latest_results(fs, root).to_pylist()
    assert latest[0]["uri"].endswith(f"videos/cc/{video_id}.mp4")


def test_planning_streams_a_part_before_reading_all_of_it(ray_cluster, tmp_path, monkeypatch):
    """A planning task yields its first rows while the rest of its part is still unread."""
    ray = ray_cluster

    from kvray.distributed import row_planning as P
    from kvray.io import manifest as M

    monkeypatch.setattr(M, "READ_BATCH_ROWS", 4)
    path = _manifest(tmp_path / "m.parquet", [{"prompt": f"scene {i}", **FAST} for i in range(40)])
    manifest = open_manifest(path)
    job = RenderJob(manifest=path, out=str(tmp_path / "out"))
    read = []
    original = M.part_batches

    def counting(fs, part):
        for position, batch in original(fs, part):
            read.append(batch.num_rows)
            yield position, batch

    monkeypatch.setattr(P, "part_batches", counting)
    inputs = P.PlanInputs(job.model_dump_json(), "run", "", ray.put({}), ray.put(np.array([], np.int64)),
                          ray.put(np.array([], dtype="S32")))
    stream = P.plan_part({"part": [json.dumps(P.asdict(manifest.parts[0]))]}, inputs)
    first = next(stream)
    assert len(first) == 4 and sum(read) == 4 < manifest.rows
    assert sum(len(f) for f in stream) == 36


@pytest.mark.slow
def test_dry_run_counts_and_writes_nothing_then_limit_renders_the_first_pending(ray_cluster, tmp_path, capsys):
    from kvray.cli import main
    from kvray.distributed.dryrun import dry_run
    from kvray.distributed.render import render

    rows = [{"id": f"r{i}", "prompt": f"scene {i}", **FAST} for i in range(6)]
    rows += [{"id": "dup", "prompt": "one", **FAST}, {"id": "dup", "prompt": "two", **FAST},
             {"id": "bad", "prompt": "x", "width": 100}, {"prompt": "same", **FAST}, {"prompt": "same", **FAST}]
    path = _manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    job = RenderJob(manifest=path, out=str(out))
    fs, root = open_fs(str(out))
    done = plan_row(rows[0], job.defaults, job.models.version, (128, 128)).video_id
    _mark_done(fs, root, [done])
    before = sorted(p for p in out.rglob("*"))

    report = dry_run(job, costs=None)
    assert (report.rows, report.pending, report.skipped, report.error, report.repeats) == (11, 6, 1, 3, 1)
    assert any("dup" in e for e in report.first_errors) and any("multiple of 64" in e for e in report.first_errors)
    assert sorted(p for p in out.rglob("*")) == before  # nothing written

    assert main(["render", path, "--out", str(out), "--dry-run", "--costs",
                 "text=0.01,keyframes=1,interpolate=0.1,decode=0.5", "--gpus", "4"]) == 0
    printed = capsys.readouterr().out
    assert "pending 6" in printed and "GPU-hours" in printed
    assert sorted(p for p in out.rglob("*")) == before

    summary = render(job, limit=2)
    assert summary.ok == 2 and summary.skipped == 1 and summary.repeats == 1
    assert len(list((out / "videos").rglob("*.mp4"))) == 2
