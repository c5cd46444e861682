"""What a real cluster does to a render, on a two-node Ray of this module's own (two raylets on this
machine): the tiny job submitted to a healthy 4-CPU cluster finishes (pools and planning fit in what
the cluster has: nothing waits on a CPU the pools hold), and a render that loses a node half-way still
renders every row exactly once."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kvray.distributed import submit as sub
from kvray.distributed.local_cluster import QUICK_NODE_FAILURE_DETECTION, start_head

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_nodes():
    cluster = start_head(cpus=2, env=QUICK_NODE_FAILURE_DETECTION)
    try:
        second = cluster.add_node(cpus=2)
        yield cluster, second
    finally:
        cluster.stop()


def test_the_tiny_job_submitted_to_a_two_node_cluster_finishes(two_nodes, tmp_path):
    """The job that hung forever at 3.5/4.0 CPUs before (its pools held the CPUs a repartition waited for)."""
    cluster, _ = two_nodes
    rows = 4  # two per keyframes actor; the job's pools and plan are what could deadlock, not the rows
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": [f"scene {i}" for i in range(rows)],
                             "width": [64] * rows, "height": [64] * rows, "steps": [1] * rows,
                             "interpolation_steps": [1] * rows}), tmp_path / "m.parquet")
    logs = io.StringIO()
    code = sub.submit(str(tmp_path / "m.parquet"), str(tmp_path / "out"), address=cluster.url,
                      render_args=["--job", "cluster/job-tiny.yaml", "--stall-timeout", "300"], stream=logs)
    assert code == 0, logs.getvalue()[-3000:]
    assert len(list((tmp_path / "out" / "videos").rglob("*.mp4"))) == rows


def _ledger_node(cluster) -> int | None:
    """The raylet whose node holds the run's ledger (None: not found). Read from the process table, in
    milliseconds: a probe through Ray takes seconds, and a short run could end before the kill."""
    raylets = cluster.raylets()
    for ledger in cluster.actors("ray::RunLedger"):
        with contextlib.suppress(psutil.Error):
            return next((p.pid for p in ledger.parents() if p.pid in raylets), None)
    return None


def test_losing_a_node_half_way_renders_every_row_exactly_once(two_nodes, tmp_path):
    """SIGKILL the second node's raylet mid-run (taking its stage actors, and the run's ledger when it
    lives there): the lost actors restart on the surviving node, retried batches write nothing twice,
    and the run finishes with every row once. Two actors in the pools that compute and write (keyframes,
    decode), so that each has one on the lost node; one in the others (each actor start costs seconds)."""
    cluster, second = two_nodes
    rows = 8
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": [f"scene {i}" for i in range(rows)],
                             "width": [64] * rows, "height": [64] * rows, "steps": [2] * rows,
                             "interpolation_steps": [1] * rows}), tmp_path / "m.parquet")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "deployment": {"text": {"actors": 1}, "keyframes": {"actors": 2}, "interpolate": {"actors": 1},
                       "decode": {"actors": 2}}, "stall_timeout_s": 240}))
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "kvray.cli", "render", str(tmp_path / "m.parquet"), "--out", str(out),
                               "--job", str(tmp_path / "job.yaml"), "--address", cluster.address],
                              env=cluster.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and not list((out / "meta").rglob("*.json")):
        time.sleep(0.2)
    assert driver.poll() is None, driver.stdout.read()[-3000:]
    ledger_on_lost_node = _ledger_node(cluster) == second
    os.kill(second, signal.SIGKILL)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    assert "finished" in output and f"ok {rows}" in output, (ledger_on_lost_node, output[-2000:])
    assert len(list((out / "videos").rglob("*.mp4"))) == rows == len(list((out / "meta").rglob("*.json")))
    assert not list(out.rglob("*.tmp"))
