"""`kvray bench soak`: render rounds of a tiny manifest for N minutes while stage actors are
SIGKILLed at random; report rows lost and duplicated (both must be 0)."""

from __future__ import annotations

import random
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..config.job import RayOptions, RenderJob
from ..distributed.cluster import connect, disconnect
from ..distributed.faults import kill_a_stage_actor
from ..distributed.render import render


def _killer(stop: threading.Event, every: float, rng: random.Random, kills: list) -> None:
    while not stop.wait(rng.uniform(0.5 * every, 1.5 * every)):
        stage = kill_a_stage_actor(rng)
        if stage is not None:
            kills.append(stage)


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
            for path in (out_dir / "results" / summary.run_id).glob("*.parquet"):
                for row_id in pq.read_table(path, columns=["id"]).column("id").to_pylist():
                    seen[row_id] = seen.get(row_id, 0) + 1
            videos = len(list((out_dir / "videos").rglob("*.mp4")))
            totals["rounds"] += 1
            totals["rows"] += rows
            totals["ok"] += summary.ok
            totals["error"] += summary.error
            totals["lost"] += sum(1 for i in ids if i not in seen)
            totals["duplicated"] += sum(c - 1 for c in seen.values() if c > 1) + max(0, videos - summary.ok)
            totals["kills"] += len(kills)
    finally:
        if started:
            disconnect()
    return totals
