"""The renderer with stand-in stage actors: what `kvray bench pipeline --simulate` runs.

The real `render` runs (planning tasks from a real manifest, the same pools, batch sizes, logical-GPU
requests, block sizes, results and run records); only the model call of each stage is replaced: a
stand-in sleeps the profiled cost per video divided by the fraction of a GPU it holds (k actors
sharing a GPU each run at 1/k speed), and hands on a payload of the profiled size. The text stand-in
sleeps once per distinct prompt of a batch, as `EncodeText` encodes once per prompt. The measurement
itself lives with the benchmarks (`kvray.bench.simulation`).

Stand-in actors import no torch (kvray.distributed.rows is torch-free), so that dozens of them start
quickly on a small machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..config.job import Deployment, RenderJob
from ..config.stages import STAGES
from .pools import PoolOptions
from .render import RenderSummary, render
from .rows import OK, StageWorker


class SimStageWorker(StageWorker):
    """A stage actor that sleeps instead of computing. Subclasses (made by `stand_in_workers`) set
    `stage`, `seconds` (per video on a whole GPU, already time-scaled), `payload_bytes` and
    `dedupe_prompts`."""

    seconds: float
    payload_bytes: int = 0
    dedupe_prompts: bool = True

    def setup(self) -> None:
        gpus = self.deployment.gpus
        # A fraction f of a GPU runs at f of its speed; whole GPUs (memory-bound actors) give no speed-up.
        self.seconds_per_video = self.seconds / gpus if 0 < gpus < 1 else self.seconds
        self.payload = b"\x01" * self.payload_bytes

    def process(self, rows):
        units = len(rows)
        if self.stage == "text" and self.dedupe_prompts:
            units = len({json.loads(r)["prompt"] for r in rows["request"]})
        deadline = time.perf_counter() + units * self.seconds_per_video
        while (left := deadline - time.perf_counter()) > 0:
            time.sleep(left)
        if self.stage == "decode":  # the video goes to storage; only its URI travels on
            return {i: {"status": OK, "uri": f"sim://{v}", "payload": b""} for i, v in zip(rows.index, rows["video_id"])}
        return {i: {"payload": self.payload} for i in rows.index}


def stand_in_workers(seconds: dict[str, float], payload_bytes: dict[str, int] | None = None,
                     dedupe_prompts: bool = True) -> dict[str, type]:
    """One stand-in class per stage (Ray Data needs a class per actor pool), carrying its cost."""
    payload_bytes = payload_bytes or {}
    return {
        stage: type(f"Sim{stage.capitalize()}Worker", (SimStageWorker,),
                    {"stage": stage, "seconds": float(seconds[stage]), "payload_bytes": int(payload_bytes.get(stage, 0)),
                     "dedupe_prompts": dedupe_prompts})
        for stage in STAGES
    }


def simulated_render(workers: dict[str, type], deployment: Deployment, videos: int, *, prompts: int | None = None,
                     pool_options: PoolOptions = PoolOptions(), on_rows=None) -> RenderSummary:
    """`render` of a manifest of `videos` rows (`prompts` distinct prompts, default all distinct) with the
    stand-in `workers`, on the running Ray, in a temporary directory."""
    prompts = prompts or videos
    with tempfile.TemporaryDirectory(prefix="kvray-sim-") as tmp:
        manifest = Path(tmp) / "prompts.parquet"
        pq.write_table(pa.table({"id": [f"sim-{i:06d}" for i in range(videos)],
                                 "prompt": [f"simulated prompt {i % prompts}" for i in range(videos)],
                                 "seed": list(range(videos))}), manifest)
        job = RenderJob(manifest=str(manifest), out=str(Path(tmp) / "out"), deployment=deployment)
        return render(job, workers=workers, pool_options=pool_options, on_rows=on_rows)
