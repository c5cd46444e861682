"""`kvray bench generate`: seconds per stage and per video of the in-process pipeline, and what batch
invariance costs against request-mixing batches."""

from __future__ import annotations

import time

from ..config.models import ModelSource
from ..config.runtime import RuntimeConfig
from ..pipeline import VideoPipeline, VideoRequest


def _requests(request: VideoRequest, count: int, offset: int) -> list[VideoRequest]:
    """Distinct prompts and seeds: the text stage encodes each distinct prompt once."""
    return [request.model_copy(update={"prompt": f"{request.prompt} #{offset + i}", "seed": offset + i})
            for i in range(count)]


def _timed_videos(pipeline: VideoPipeline, request: VideoRequest, videos: int, batch: int,
                  totals: dict[str, float]) -> float:
    """Wall seconds for `videos` videos in batches of `batch`; adds each stage's seconds to `totals`."""
    start = time.perf_counter()
    done = 0
    while done < videos:
        n = min(batch, videos - done)
        for video in pipeline.generate(_requests(request, n, done)):
            for stage, seconds in video.timings.items():
                totals[stage] = totals.get(stage, 0.0) + seconds
        done += n
    return time.perf_counter() - start


def bench_generate(models: ModelSource, runtime: RuntimeConfig, request: VideoRequest, *, videos: int = 2,
                   batch: int = 1, warmup: int = 1) -> dict:
    """Times `videos` videos in batches of `batch` after `warmup` untimed batches; seconds per video per stage."""
    start = time.perf_counter()
    pipeline = VideoPipeline(models, runtime)
    load_seconds = time.perf_counter() - start
    for w in range(warmup):
        pipeline.generate(_requests(request, batch, 10_000 + w * batch))
    totals: dict[str, float] = {}
    wall = _timed_videos(pipeline, request, videos, batch, totals)
    return {
        "load_seconds": load_seconds,
        "videos": videos,
        "batch": batch,
        "seconds_per_video": wall / videos,
        "stage_seconds_per_video": {stage: seconds / videos for stage, seconds in totals.items()},
        "device": str(pipeline.keyframes.device),
    }


def bench_mixing(models: ModelSource, runtime: RuntimeConfig, request: VideoRequest, *, videos: int = 4,
                 batch: int = 4, rounds: int = 3) -> dict:
    """Per-request network calls (`batch_invariant: true`) against request-mixing batches, in one process:
    `rounds` alternating rounds of `videos` videos in batches of `batch` each, after one warm-up batch
    each; the fastest round of each counts. Two pipelines are loaded (twice the weights' memory)."""
    pipelines = {mode: VideoPipeline(models, runtime.model_copy(update={"batch_invariant": mode}))
                 for mode in (True, False)}
    for pipeline in pipelines.values():
        pipeline.generate(_requests(request, batch, 10_000))
    walls: dict[bool, list[float]] = {True: [], False: []}
    stages: dict[bool, dict[str, float]] = {True: {}, False: {}}
    for _ in range(rounds):
        for mode, pipeline in pipelines.items():
            totals: dict[str, float] = {}
            walls[mode].append(_timed_videos(pipeline, request, videos, batch, totals))
            if walls[mode][-1] == min(walls[mode]):
                stages[mode] = {stage: seconds / videos for stage, seconds in totals.items()}
    best = {mode: min(w) / videos for mode, w in walls.items()}
    return {
        "videos": videos, "batch": batch, "rounds": rounds, "device": str(pipelines[True].keyframes.device),
        "seconds_per_video": {"invariant": best[True], "mixing": best[False]},
        "stage_seconds_per_video": {"invariant": stages[True], "mixing": stages[False]},
        "ratio": best[True] / best[False],
    }
