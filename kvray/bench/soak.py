"""`kvray bench soak`: rounds of a small manifest rendered for N minutes while faults are injected;
rows lost, duplicated and partial files counted (all must be 0).

The render runs as `kvray render --address ...` drivers against a two-node Ray of the soak's own
(`kvray.distributed.local_cluster`). Fault kinds (all on by default):

- actors: a random stage actor SIGKILLed (its batch is retried on a replacement);
- driver: the render's driver SIGKILLed, the job resubmitted (`--take-over`);
- node: the second node's raylet SIGKILLed (its actors lost), the node started again for the next round;
- storage: the outputs on S3 (moto's server on loopback, from the test extras) behind fault-injecting
  proxies: 503 SlowDown, 500 InternalError and connection resets on a share of the requests each.

After each round: every manifest row has exactly one latest result (ok), one video per ok row, every
video decodes, no temporary file is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

FAULTS = ("actors", "driver", "node", "storage")
FAULT_SHARE = 0.03  # of S3 requests, per proxy (503, 500, reset)
ATTEMPTS = 8  # drivers per round before the round counts as failed
CREDENTIALS = {"key": "kvray-soak-access-key", "secret": "kvray-soak-secret-key"}


@contextlib.contextmanager
def _faulty_s3(seed: int):
    """A bucket on moto's server behind three chained fault proxies: (URI of the bucket, endpoint)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        raise RuntimeError("the storage faults need moto's server: pip install 'moto[server]' (a test extra)") from err
    import s3fs

    from .fault_proxy import FaultyProxy

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request at INFO
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        upstream = f"http://{host}:{port}"
        s3fs.S3FileSystem(**CREDENTIALS, client_kwargs={"endpoint_url": upstream}).mkdir("kvray-soak")
        with contextlib.ExitStack() as proxies:
            for index, fault in enumerate(("slowdown", "internal", "reset")):
                upstream = proxies.enter_context(
                    FaultyProxy(upstream, fault_rate=FAULT_SHARE, seed=seed + index, fault=fault)).url
            yield "s3://kvray-soak", upstream
    finally:
        server.stop()


def _check_round(out: str, options: dict, ids: list[str]) -> dict[str, int]:
    """Rows lost (no ok result), duplicated (a video written for no row, or a row twice), partial files."""
    from ..io.layout import latest_results
    from ..io.opening import open_fs
    from ..io.video import read_video

    fs, root = open_fs(out, {**options, "skip_instance_cache": True})
    latest = latest_results(fs, root).to_pylist()
    by_id: dict[str, list[dict]] = {}
    for row in latest:
        by_id.setdefault(row["id"], []).append(row)
    lost = sum(1 for i in ids if not any(r["status"] in ("ok", "skipped") for r in by_id.get(i, [])))
    videos = [p for p in (fs.find(f"{root}/videos") if fs.isdir(f"{root}/videos") else []) if p.endswith(".mp4")]
    wanted = {r["video_id"] for r in latest if r["status"] in ("ok", "skipped")}
    duplicated = sum(len(v) - 1 for v in by_id.values() if len(v) > 1) + sum(
        1 for p in videos if p.rpartition("/")[2][:-4] not in wanted)
    partial = sum(1 for p in fs.find(root) if p.rpartition("/")[2].endswith(".tmp"))
    for path in videos:
        try:
            read_video(fs.cat_file(path))
        except Exception:  # a video that does not decode is a partial file, whatever the reason
            partial += 1
    return {"lost": lost, "duplicated": duplicated, "partial": partial}


def _inject(fault: str, cluster, driver: subprocess.Popen, rng: random.Random, node: list[int]) -> bool:
    """One fault; whether it was injected."""
    if fault == "actors":
        actors = cluster.stage_actors()
        if not actors:
            return False
        with contextlib.suppress(Exception):
            rng.choice(actors).send_signal(signal.SIGKILL)
        return True
    if fault == "driver":
        driver.send_signal(signal.SIGKILL)
        return True
    if fault == "node" and node:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pop(), signal.SIGKILL)
        return True
    return False


def _write_round(work: Path, n: int, rows: int, rng: random.Random, bucket, endpoint):
    """Round n's rows, manifest and job file: (ids, manifest, job, output URI, storage options)."""
    ids = [f"r{n}-{i}" for i in range(rows)]
    manifest = work / f"round{n}.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": [f"soak {i}" for i in ids], "width": [64] * rows,
                             "height": [64] * rows, "steps": [2] * rows,
                             "fps": [rng.choice(["low", "medium"]) for _ in ids]}), manifest)
    round_out = f"{bucket}/round{n}" if bucket else str(work / f"out{n}")
    options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint}} if bucket else {}
    job = work / f"round{n}.yaml"
    job.write_text(yaml.safe_dump({"storage_options": options, "lease_ttl_s": 10, "stall_timeout_s": 600,
                                   "deployment": {s: {"actors": 2} for s in ("keyframes", "decode")}}))
    job.chmod(0o600)  # the job may carry the store's credentials
    return ids, manifest, job, round_out, options


def soak(minutes: float, rows: int = 12, kill_every: float = 20.0, seed: int = 0, out: str | None = None,
         faults: tuple[str, ...] = FAULTS, faults_per_round: int | None = None) -> dict:
    from ..distributed.local_cluster import start_head

    rng = random.Random(seed)
    work = Path(out or tempfile.mkdtemp(prefix="kvray-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    totals = {"rounds": 0, "rows": 0, "ok": 0, "lost": 0, "duplicated": 0, "partial": 0,
              "injected": {f: 0 for f in faults}, "attempts": 0, "failed_rounds": 0}
    cluster = start_head(cpus=4)
    storage = _faulty_s3(seed) if "storage" in faults else contextlib.nullcontext((None, None))
    try:
        with storage as (bucket, endpoint):
            deadline = time.time() + minutes * 60
            while time.time() < deadline:
                node = [cluster.add_node(cpus=2)] if "node" in faults else []
                n = totals["rounds"]
                ids, manifest, job, round_out, options = _write_round(work, n, rows, rng, bucket, endpoint)
                finished, attempts, injected = False, 0, 0
                while not finished and attempts < ATTEMPTS:
                    attempts += 1
                    totals["attempts"] += 1
                    log = (work / f"round{n}-attempt{totals['attempts']}.log").open("w")
                    driver = subprocess.Popen(
                        [sys.executable, "-m", "kvray.cli", "render", str(manifest), "--out", round_out, "--job", str(job),
                         "--address", cluster.address, "--take-over"], env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
                    next_fault = time.time() + rng.uniform(0.5, 1.5) * kill_every
                    while driver.poll() is None:
                        if time.time() >= next_fault and (faults_per_round is None or injected < faults_per_round):
                            fault = rng.choice([f for f in faults if f != "storage"] or ["none"])
                            if fault != "none" and _inject(fault, cluster, driver, rng, node):
                                totals["injected"][fault] += 1
                                injected += 1
                            next_fault = time.time() + rng.uniform(0.5, 1.5) * kill_every
                        time.sleep(0.2)
                    log.close()
                    finished = driver.returncode in (0, 1)  # the round ran to its end (1: error rows)
                totals["failed_rounds"] += not finished
                checked = _check_round(round_out, options, ids)
                totals["rounds"] += 1
                totals["rows"] += rows
                totals["ok"] += rows - checked["lost"]
                for key in ("lost", "duplicated", "partial"):
                    totals[key] += checked[key]
                cluster.stop()
                cluster = start_head(cpus=4)
    finally:
        cluster.stop()
    if "storage" in faults:
        totals["injected"]["storage"] = "503, 500 and resets on 3% of requests each"
    return totals


def add_soak_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "soak", help="render rounds for N minutes while faults are injected; rows lost / duplicated / partial",
        description="Rounds of a small manifest rendered on a two-node Ray of the soak's own, with stage actors, "
                    "the driver and the second node killed at random and the outputs on S3 behind fault-injecting "
                    "proxies; counts rows lost, duplicated and partial files (all must be 0).")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--rows", type=int, default=12, help="rows per round (default 12)")
    p.add_argument("--kill-every", type=float, default=20.0, help="mean seconds between faults (default 20)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"fault kinds, comma separated (default {','.join(FAULTS)})")
    p.add_argument("--faults-per-round", type=int, default=None,
                   help="at most this many faults in a round, then it runs to its end (default: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="where rounds write manifests, logs and local outputs (default: a temporary directory)")
    p.set_defaults(run=run_soak_command)
    return p


def run_soak_command(args) -> int:
    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        print(f"error: unknown fault kind(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    totals = soak(args.minutes, rows=args.rows, kill_every=args.kill_every, seed=args.seed, out=args.out, faults=faults,
                   faults_per_round=args.faults_per_round)
    print(f"rounds {totals['rounds']}, rows {totals['rows']}, driver attempts {totals['attempts']}; injected "
          + json.dumps(totals["injected"]))
    print(f"rows lost {totals['lost']}, rows duplicated {totals['duplicated']}, partial files {totals['partial']}"
          + (f"; rounds that never finished {totals['failed_rounds']} (their logs are in the --out folder)"
             if totals["failed_rounds"] else ""))
    return 0 if totals["lost"] == totals["duplicated"] == totals["partial"] == 0 else 1
