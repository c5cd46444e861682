"""`kvray bench soak`: render rounds of a tiny manifest for N minutes while stage actors are
SIGKILLed at random; report rows lost and duplicated (both must be 0)."""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ..config.job import STAGES, RayOptions, RenderJob
from ..distributed.cluster import connect
from ..distributed.render import render


def _killer(stop: threading.Event, every: float, rng: random.Random, kills: list) -> None:
    while not stop.wait(rng.uniform(0.5 * every, 1.5 * every)):
        registries = [a for a in ray.util.list_named_actors() if a.startswith("kvray-registry-")]
        if not registries:
            continue
        try:
            actors = ray.get(ray.get_actor(registries[-1]).report.remote(), timeout=10)["actors"]
        except Exception:  # the run ended between the two calls
            continue
        live = [(stage, a["pid"]) for stage in STAGES for a in actors.get(stage, [])]
        if live:
            stage, pid = rng.choice(live)
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append(stage)
            except ProcessLookupError:
                pass


def soak(minutes: float, rows: int = 12, kill_every: float = 5.0, seed: int = 0, out: str | None = None) -> dict:
    rng = random.Random(seed)
    root = Path(out or tempfile.mkdtemp(prefix="kvray-soak-"))
    started = connect(RayOptions())
    totals = {"rounds": 0, "rows": 0, "ok": 0, "error": 0, "lost": 0, "duplicated": 0, "kills": 0}
    deadline = time.time() + minutes * 60
    try:
        while time.time() < deadline:
            n = totals["rounds"]
            ids = [f"r{n}-{i}" for i in range(rows)]
            manifest = root / f"round{n}.parquet"
            pq.write_table(pa.table({"id": ids, "prompt": [f"soak {i}" for i in ids], "width": [64] * rows,
                                     "height": [64] * rows, "steps": [2] * rows, "interpolation_steps": [2] * rows,
                                     "fps": [rng.choice(["low", "medium"]) for _ in ids]}), manifest)
            out_dir = root / f"out{n}"
            job = RenderJob(manifest=str(manifest), out=str(out_dir))
            stop, kills = threading.Event(), []
            killer = threading.Thread(target=_killer, args=(stop, kill_every, rng, kills), daemon=True)
            killer.start()
            try:
                summary = render(job)
            finally:
                stop.set()
                killer.join()
            seen: dict[str, int] = {}
            for path in (out_dir / "results").glob("*.parquet"):
                for row_id in pq.read_table(path, columns=["id"]).column("id").to_pylist():
                    seen[row_id] = seen.get(row_id, 0) + 1
            videos = len(list((out_dir / "videos").iterdir())) if (out_dir / "videos").exists() else 0
            totals["rounds"] += 1
            totals["rows"] += rows
            totals["ok"] += summary.ok
            totals["error"] += summary.error
            totals["lost"] += sum(1 for i in ids if i not in seen)
            totals["duplicated"] += sum(c - 1 for c in seen.values() if c > 1) + max(0, videos - summary.ok)
            totals["kills"] += len(kills)
    finally:
        if started:
            ray.shutdown()
    return totals
