"""A render into WebDataset shards on S3, its driver SIGKILLed mid-run and the job resubmitted: every ok row
in exactly one shard, no shard over its size, no partial shard visible, the shards streamed straight from
S3 by `webdataset` and decoded with PyAV, the index loaded by `datasets`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from kvray.config.job import RenderJob
from kvray.io.layout import latest_results
from kvray.io.shards import read_index, scan_shards
from kvray.io.video import read_video

pytestmark = pytest.mark.slow

# Small here; the 200 rows in shards of 32 with KVRAY_TEST_DATASET_ROWS=200 KVRAY_TEST_DATASET_SHARD=32.
ROWS = int(os.environ.get("KVRAY_TEST_DATASET_ROWS", 16))
SHARD = int(os.environ.get("KVRAY_TEST_DATASET_SHARD", 4))


def test_shards_on_s3_exactly_once_after_a_killed_driver(ray_cluster, s3_bucket, tmp_path, monkeypatch):
    from kvray.distributed.render import render

    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(ROWS)], "prompt": [f"clip number {i}" for i in range(ROWS)],
                             "width": [64] * ROWS, "height": [64] * ROWS, "steps": [1] * ROWS}), sink)
    fs.pipe(f"{s3_bucket.name}/in/prompts.parquet", sink.getvalue())
    manifest, out = f"s3://{s3_bucket.name}/in/prompts.parquet", f"s3://{s3_bucket.name}/data"
    root = f"{s3_bucket.name}/data"
    # The session's Ray started before the S3 fixture set its credentials: its workers get them from the job.
    endpoint = [f"--storage-option=client_kwargs.endpoint_url={s3_bucket.endpoint_url}",
                f"--storage-option=key={s3_bucket.storage_options['key']}",
                f"--storage-option=secret={s3_bucket.storage_options['secret']}"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "kvray.cli", "render", manifest, "--out", out, "--layout", "webdataset",
         "--shard-size", str(SHARD), "--address", ray_cluster.get_runtime_context().gcs_address, *endpoint],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        fs.invalidate_cache()
        if fs.exists(f"{root}/index") and len(fs.ls(f"{root}/index")) >= 1:
            break
        time.sleep(0.3)
    assert driver.poll() is None, ("the run ended before its driver could be killed",
                                   driver.stderr.read() if driver.poll() is not None else "")
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)

    job = RenderJob(manifest=manifest, out=out, storage_options=s3_bucket.storage_options,
                    dataset={"layout": "webdataset", "shard_size": SHARD})
    summary = render(job, take_over=True)  # its driver is known dead: no need to wait for its lease to expire
    assert summary.status == "finished" and summary.error == 0
    killed = [json.loads(fs.cat(p)) for p in fs.glob(f"{root}/runs/*.json")]
    assert sorted(r["status"] for r in killed) == ["finished", "interrupted"]
    assert summary.skipped >= 1, "the killed run committed nothing"

    fs.invalidate_cache()
    scan = scan_shards(fs, root)
    assert not scan.orphans  # no partial shard visible
    index = read_index(fs, root, ["key", "shard", "id"]).to_pylist()
    keys = [row["key"] for row in index]
    assert len(keys) == len(set(keys)) == ROWS  # every ok row in exactly one shard
    per_shard = {}
    for row in index:
        per_shard[row["shard"]] = per_shard.get(row["shard"], 0) + 1
    assert max(per_shard.values()) <= SHARD
    latest = latest_results(fs, root).to_pylist()
    assert sorted(r["id"] for r in latest) == sorted(f"r{i}" for i in range(ROWS))
    assert {r["video_id"] for r in latest if r["status"] in ("ok", "skipped")} == set(keys)

    # The webdataset library streams the shards straight from S3; a sample's mp4 decodes with PyAV.
    import webdataset as wds
    from webdataset.gopen import gopen_schemes

    options = s3_bucket.storage_options
    monkeypatch.setitem(gopen_schemes, "s3", lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode, **options).open())
    shards = sorted({f"s3://{root}/{name}" for name in per_shard})
    streamed = list(wds.WebDataset(shards, shardshuffle=False))
    assert sorted(s["__key__"] for s in streamed) == sorted(keys)
    frames, _ = read_video(streamed[0]["mp4"])
    assert frames.shape == (12, 64, 64, 3) and streamed[0]["txt"].decode().startswith("clip number")
    # datasets loads the index as it is.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    loaded = datasets.load_dataset("parquet", data_files=f"s3://{root}/index/*.parquet", split="train",
                                   storage_options=options)
    assert loaded.num_rows == ROWS and fs.exists(f"{root}/README.md")
