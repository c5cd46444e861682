"""Reliability and safety of the renderer: bad rows, untrusted ids, secrets, killed actors, flaky storage."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from kvray.bench.fault_proxy import FaultyProxy
from kvray.config.job import RenderJob

from .bad_images import broken_chunk_png

pytestmark = pytest.mark.slow

FAST = {"width": 64, "height": 64, "steps": 2, "interpolation_steps": 2}
SECRET = "PLANTED-SECRET-7f3a9c"


def _manifest(path, rows: list[dict]) -> str:
    columns = sorted({k for r in rows for k in r})
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return str(path)


def _results(out) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for path in (out / "results").glob("*/*.parquet"):
        for row in pq.read_table(path).to_pylist():
            rows.setdefault(row["id"], []).append(row)
    return rows


def test_bad_rows_untrusted_ids_and_secrets(ray_cluster, tmp_path, capfd):
    from kvray.distributed.render import render

    (tmp_path / "not-an-image.png").write_bytes(b"hello")
    (tmp_path / "fuzzed.png").write_bytes(broken_chunk_png())  # Pillow raises SyntaxError on it
    rows = [
        {"id": "good", "prompt": "a red car"},
        {"id": "long", "prompt": "a very long prompt " * 20},
        {"id": "../../escape", "prompt": "a fox"},
        {"id": "/etc/passwd", "prompt": "a bird"},
        {"id": "s3://other-bucket/x", "prompt": "a boat"},
        {"id": "no-image", "prompt": "a cat", "image": str(tmp_path / "missing.png")},
        {"id": "bad-image", "prompt": "a cat", "image": str(tmp_path / "not-an-image.png")},
        {"id": "fuzzed-image", "prompt": "a cat", "image": str(tmp_path / "fuzzed.png")},
        {"id": "outside-image", "prompt": "a cat", "image": "/etc/hostname"},
        {"id": "metadata-image", "prompt": "a cat", "image": "http://169.254.169.254/latest/meta-data/"},
        {"id": "control", "prompt": "a cat\x1b[2J"},
        {"id": "dup", "prompt": "one"},
        {"id": "dup", "prompt": "two"},
        {"id": "nan", "prompt": "a dog", "guidance_weight_image": math.nan},
        {"id": "seed", "prompt": "a dog", "seed": -3},
        {"id": "huge", "prompt": "a dog", "width": 4096},
        {"id": "blank", "prompt": " "},
    ]
    for row in rows:
        row.update({k: v for k, v in FAST.items() if k not in row})
    out = tmp_path / "out"
    # The bad image rows share keyframes batches with good rows: a bad image fails its row only.
    job = RenderJob(manifest=_manifest(tmp_path / "m.parquet", rows), out=str(out),
                    storage_options={"client_secret": SECRET}, deployment={"keyframes": {"batch_size": 8}})
    summary = render(job)
    results = _results(out)
    assert sorted(results) == sorted({r["id"] for r in rows})
    assert all(len(v) == 1 for k, v in results.items() if k != "dup") and len(results["dup"]) == 2
    status = {k: [r["status"] for r in v] for k, v in results.items()}
    ok = {"good", "long", "../../escape", "/etc/passwd", "s3://other-bucket/x"}
    assert {k for k, s in status.items() if s == ["ok"]} == ok
    reasons = {k: v[0]["error"] for k, v in results.items()}
    assert "missing.png" in reasons["no-image"] and "not a readable image" in reasons["bad-image"]
    assert "not a readable image" in reasons["fuzzed-image"] and "SyntaxError" in reasons["fuzzed-image"]
    assert "outside the allowed directories" in reasons["outside-image"]
    assert "link-local or cloud metadata" in reasons["metadata-image"]
    assert "control character U+001B" in reasons["control"]
    assert all("not unique" in r["error"] for r in results["dup"])
    assert "finite" in reasons["nan"] and "seed" in reasons["seed"] and "2048" in reasons["huge"]
    assert "prompt is empty" in reasons["blank"]
    assert summary.ok == len(ok)
    # Over-long prompts render, truncated, and say so.
    assert results["long"][0]["prompt_truncated"] and not results["good"][0]["prompt_truncated"]
    video_id = results["long"][0]["video_id"]
    meta = json.loads((out / "meta" / video_id[:2] / f"{video_id}.json").read_text())
    assert meta["prompt_truncated"] is True
    # Ids never become paths: everything is under the prefix, named by hash.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(out) for p in files if p.suffix in (".mp4", ".json") and p.parent != tmp_path)
    assert not (tmp_path.parent / "escape").exists()
    # The planted secret is in no output and in no log line.
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert SECRET not in captured.out and SECRET not in captured.err


@pytest.fixture
def flaky_s3(s3_bucket):
    def job_through(proxy: FaultyProxy, tmp_path) -> RenderJob:
        options = {**s3_bucket.storage_options, "client_kwargs": {"endpoint_url": proxy.url},
                   "config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}
        options.pop("endpoint_url", None)
        fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
        sink = io.BytesIO()
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(3)], "prompt": ["a", "b", "c"],
                                 **{k: [v] * 3 for k, v in FAST.items()}}), sink)
        fs.pipe(f"{s3_bucket.name}/in.parquet", sink.getvalue())
        return RenderJob(manifest=f"s3://{s3_bucket.name}/in.parquet", out=f"s3://{s3_bucket.name}/out",
                         storage_options=options)
    return job_through


def test_flaky_storage_is_retried(ray_cluster, s3_bucket, flaky_s3, tmp_path):
    from kvray.distributed.render import render

    with FaultyProxy(s3_bucket.endpoint_url, fault_rate=0.05, seed=1) as proxy:
        summary = render(flaky_s3(proxy, tmp_path))
    assert (summary.ok, summary.error) == (3, 0)
    assert proxy.faults > 0, "no fault was injected"


def test_storage_that_always_fails_stops_with_a_clear_error(ray_cluster, s3_bucket, flaky_s3, tmp_path, capsys):
    from kvray.cli import main

    with FaultyProxy(s3_bucket.endpoint_url, fault_rate=0.0) as good:
        job = flaky_s3(good, tmp_path)
    with FaultyProxy(s3_bucket.endpoint_url, fault_rate=1.0) as proxy:
        job = job.model_copy(update={"storage_options": {**job.storage_options, "client_kwargs": {"endpoint_url": proxy.url},
                                                         "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}})
        (tmp_path / "job.yaml").write_text(json.dumps(job.model_dump(mode="json")))
        start = time.time()
        code = main(["render", job.manifest, "--out", job.out, "--job", str(tmp_path / "job.yaml")])
    assert code == 2 and time.time() - start < 120
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("note: the embedded toy model")  # said before any work starts
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: storage failed") and "reduce your request rate" in errors[0]


def test_killed_stage_actors_lose_and_duplicate_nothing_and_change_no_video(ray_cluster, tmp_path):
    """One run, one row per call through the fused pool (each actor runs the four stages, the default on
    CPUs), loses its actor mid-keyframes (that batch is retried on a new actor) and then the new one while
    it writes the files (between two videos or in the middle of one): every row is written exactly once,
    nothing partial is left, and each video has the bytes of the same row rendered with all rows in one
    batch through one pool per stage (same frames, same encoder)."""

    from kvray.distributed.render import render

    rows = [{"id": f"row{i}", "prompt": f"scene number {i}", **{**FAST, "steps": 6}} for i in range(5)]
    manifest = _manifest(tmp_path / "m.parquet", rows)
    retried = RenderJob(manifest=manifest, out=str(tmp_path / "retried"),
                        deployment={"pools": "fused", "fused": {"actors": 1, "batch_size": 1}})
    batched = RenderJob(manifest=manifest, out=str(tmp_path / "batched"),
                        deployment={"pools": "stages", "text": {"batch_size": 5}, "keyframes": {"batch_size": 5},
                                    "interpolate": {"batch_size": 5}})
    out = tmp_path / "retried"
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(summary=render(retried)))
    thread.start()
    killed: dict[str, int] = {}
    deadline = time.time() + 300
    while len(killed) < 2 and time.time() < deadline and thread.is_alive():
        report = _ledger_report()
        if report is not None:
            written = len(list((out / "meta").rglob("*.json")))
            ready = {"keyframes": 0 < report["model_calls"].get("keyframes", 0) < len(rows),
                     "decode": "keyframes" in killed and 0 < written < len(rows)}
            for stage in ("keyframes", "decode"):
                actors = report["actors"].get(stage, [])
                if stage not in killed and ready[stage] and actors:
                    killed[stage] = actors[-1]["pid"]  # the latest: a fused actor registers for every stage
                    os.kill(killed[stage], signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert set(killed) == {"keyframes", "decode"}, f"the run ended before both actors were killed: {killed}"
    summary = done["summary"]
    assert summary.ok == len(rows)
    assert all(len(summary.stages["actors"][stage]) >= 2 for stage in killed)  # each killed actor was replaced
    results = _results(out)
    assert sorted(results) == sorted(r["id"] for r in rows)
    assert all(len(v) == 1 and v[0]["status"] == "ok" for v in results.values())
    assert {p.stem for p in (out / "videos").rglob("*.mp4")} == {v[0]["video_id"] for v in results.values()} == {
        p.stem for p in (out / "meta").rglob("*.json")}
    # No partial file visible, and no lock file of the lease.
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert not leftovers, leftovers
    assert render(batched).ok == len(rows)
    videos = {name: {p.stem: p.read_bytes() for p in (tmp_path / name / "videos").rglob("*.mp4")}
              for name in ("retried", "batched")}
    differing = {video_id: _parted_at(tmp_path, video_id) for video_id, data in videos["retried"].items()
                 if data != videos["batched"][video_id]}
    assert not differing, f"videos differ, first at stage: {differing}"


def _parted_at(tmp_path, video_id: str) -> str:
    """The first stage whose output differs between the two renders of one video (from its metadata)."""
    metas = [json.loads(next((tmp_path / name / "meta").rglob(f"{video_id}.json")).read_text())
             for name in ("retried", "batched")]
    for stage in ("text", "keyframes", "interpolate"):
        if metas[0]["placement"][stage].get("output_sha256") != metas[1]["placement"][stage].get("output_sha256"):
            return stage
    return "decode" if metas[0]["frames_sha256"] != metas[1]["frames_sha256"] else "encode"


def _ledger_report():
    import ray

    ledgers = [a for a in ray.util.list_named_actors() if a.startswith("kvray-ledger-")]
    return ray.get(ray.get_actor(ledgers[0]).report.remote(), timeout=10) if ledgers else None


def test_losing_the_ledger_costs_only_the_report(ray_cluster, tmp_path):
    """The run's bookkeeping actor killed mid-run: every row still renders, the run finishes and is
    recorded as finished (the ledger restarts; only its live figures are lost)."""
    from kvray.distributed.render import render

    rows = [{"id": f"row{i}", "prompt": f"scene {i}", **FAST} for i in range(5)]
    out = tmp_path / "out"
    job = RenderJob(manifest=_manifest(tmp_path / "m.parquet", rows), out=str(out))
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(summary=render(job)))
    thread.start()
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and thread.is_alive():
        report = _ledger_report()
        if report and report["model_calls"].get("keyframes"):
            killed = report["pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    thread.join(timeout=300)
    assert killed is not None, "the run ended before its ledger could be killed"
    summary = done["summary"]
    assert (summary.status, summary.ok, summary.exit_code) == ("finished", 5, 0)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert len(_results(out)) == 5


def test_a_pool_that_cannot_start_stops_the_run_with_the_reason(ray_cluster, tmp_path):
    """The cluster has the GPUs on paper, but another job holds them: the decode pool never comes up, and
    after `stall_timeout_s` without progress the run stops, naming the pool and the free resources. The
    stages are stand-ins (no torch to import): what is tested is the pools and the watchdog, not the models."""
    from kvray.distributed.render import StallError, render
    from kvray.distributed.simulate import stand_in_workers

    @ray_cluster.remote(num_gpus=7, num_cpus=0)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray_cluster.get(holder.ready.remote())
    try:
        job = RenderJob(manifest=_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a fox", **FAST}]),
                        out=str(tmp_path / "out"), stall_timeout_s=4,
                        deployment={s: {"actors": 1, "gpus": 2 if s == "decode" else 0} for s in
                                    ("text", "keyframes", "interpolate", "decode")})
        reason = r"no progress for 4 s: .*decode 0 of 1 actors up \(each needs 2 GPU.*free in the cluster: .*, 1 GPU"
        with pytest.raises(StallError, match=reason):
            render(job, workers=stand_in_workers(dict.fromkeys(("text", "keyframes", "interpolate", "decode"), 0.0)))
    finally:
        ray_cluster.kill(holder)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] == "failed" and "decode 0 of 1 actors up" in run["reason"]


def test_sigint_stops_cleanly_and_records_an_interrupted_run(ray_cluster, tmp_path):
    """Ctrl-C: one line, no traceback, exit 130, the results so far flushed, the run recorded as
    interrupted; the next run renders the rest."""
    import subprocess
    import sys

    rows = [{"id": f"row{i}", "prompt": f"scene {i}", **{**FAST, "steps": 4}} for i in range(5)]
    manifest = _manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    address = ray_cluster.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "kvray.cli", "render", manifest, "--out", str(out),
                               "--address", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None and not list((out / "meta").rglob("*.json")):
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "interrupted" in stdout
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert [r["status"] for r in runs] == ["interrupted"] and "SIGINT" in runs[0]["reason"]
    from kvray.distributed.render import render

    again = render(RenderJob(manifest=manifest, out=str(out)))
    assert again.ok + again.skipped == len(rows) and again.skipped >= 1


def test_a_driver_killed_twice_then_resubmitted_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    """SIGKILL the driver mid-run, twice; each resubmission waits for the dead run's lease to expire (a
    short TTL here) and the last one finishes: one result per input row, one video per ok row, no
    partial file, the killed runs recorded as interrupted."""
    import subprocess
    import sys

    import yaml

    from kvray.distributed.render import render
    from kvray.io.layout import latest_results
    from kvray.io.opening import open_fs

    rows = [{"id": f"row{i}", "prompt": f"scene {i}", **{**FAST, "steps": 3}} for i in range(9)]
    manifest = _manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"lease_ttl_s": 3.0}))
    address = ray_cluster.get_runtime_context().gcs_address
    for kill in (1, 2):
        driver = subprocess.Popen([sys.executable, "-m", "kvray.cli", "render", manifest, "--out", str(out),
                                   "--job", str(tmp_path / "job.yaml"), "--address", address, "--wait-for-lease", "30"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        written = len(list((out / "meta").rglob("*.json")))
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None and len(list((out / "meta").rglob("*.json"))) <= written:
            time.sleep(0.1)
        assert driver.poll() is None, ("the run ended before its driver could be killed", driver.stderr.read())
        time.sleep(0.3 * kill)  # another point of the run each time
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    job = RenderJob.from_yaml(tmp_path / "job.yaml", manifest=manifest, out=str(out))
    summary = render(job, wait_for_lease_s=30)
    assert summary.status == "finished" and summary.ok + summary.skipped == len(rows)
    latest = latest_results(*open_fs(str(out))).to_pylist()
    assert sorted(r["id"] for r in latest) == sorted(r["id"] for r in rows)
    assert all(r["status"] in ("ok", "skipped") for r in latest)
    videos = {p.stem for p in (out / "videos").rglob("*.mp4")}
    assert videos == {r["video_id"] for r in latest} == {p.stem for p in (out / "meta").rglob("*.json")}
    assert not [p for p in out.rglob("*.tmp")]  # nothing partial
    runs = sorted(json.loads(p.read_text())["status"] for p in (out / "runs").glob("*.json"))
    assert runs == ["finished", "interrupted", "interrupted"]
