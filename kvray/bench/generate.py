"""`kvray bench generate`: seconds per stage and per video of the in-process pipeline."""

from __future__ import annotations

import time

from ..config import RuntimeConfig
from ..pipeline import VideoPipeline, VideoRequest
from ..config.models import ModelSource


def bench_generate(models: ModelSource, runtime: RuntimeConfig, request: VideoRequest, *, videos: int = 2,
                   batch: int = 1, warmup: int = 1) -> dict:
    """Times `videos` videos in batches of `batch` after `warmup` untimed batches; seconds per video per stage."""
    start = time.perf_counter()
    pipeline = VideoPipeline(models, runtime)
    load_seconds = time.perf_counter() - start
    requests = lambda n, offset: [request.model_copy(update={"seed": offset + i}) for i in range(n)]
    for w in range(warmup):
        pipeline.generate(requests(batch, 10_000 + w * batch))
    totals: dict[str, float] = {}
    start = time.perf_counter()
    done = 0
    while done < videos:
        n = min(batch, videos - done)
        for video in pipeline.generate(requests(n, done)):
            for stage, seconds in video.timings.items():
                totals[stage] = totals.get(stage, 0.0) + seconds
        done += n
    wall = time.perf_counter() - start
    return {
        "load_seconds": load_seconds,
        "videos": videos,
        "batch": batch,
        "seconds_per_video": wall / videos,
        "stage_seconds_per_video": {stage: seconds / videos for stage, seconds in totals.items()},
        "device": str(runtime.torch_device()),
    }
