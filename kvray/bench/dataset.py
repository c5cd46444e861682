"""`kvray bench dataset`: what the webdataset layout adds to the decode stage, as a share of its own time.

The decode stage's own time is the video MoVQ decode of one video plus its mp4 encoding (as the
renderer's decode actor does them). The layout adds the quality signals (`dataset_sample`: signals,
filters, caption) and the shard writing (`write_samples`: building the tar in memory, writing it and its
index part), the latter measured over a shard of `samples` copies of the video and counted per sample.
Random weights: the compute is the same as with real weights; the video is noise, which makes the mp4
(and so the shard) larger than real content would.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from ..config.sampling import FPS_PASSES
from ..options import add_device_option, add_preset_option, add_weights_options

GOAL_SHARE = 0.05  # the layout may add at most 5% to the decode stage at 512x512


def _timed(repeats: int, call, *args, **kwargs):
    """(fastest seconds, last result) over `repeats` calls of `call(*args, **kwargs)`."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = call(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_dataset(models, runtime, sizes, *, fps: str = "medium", samples: int = 16, repeats: int = 1,
                  out: str | None = None, progress=None) -> dict:
    """For each (width, height): seconds of decode, encode, quality signals and shard writing per sample,
    and the share the last two add to the first two. `out`: where the shards go (default a temporary
    directory, removed afterwards)."""
    import torch

    from ..config.dataset import DatasetConfig
    from ..io.opening import open_fs
    from ..io.shards import Sample, write_samples
    from ..pipeline import Video, VideoRequest
    from ..pipeline.device import torch_device
    from ..pipeline.samples import dataset_sample, video_metadata
    from ..pipeline.stages import Decode
    from ..requests.manifest import video_id
    from ..sampling import LATENT_CHANNELS

    say = progress or (lambda message: None)
    decode = Decode.from_source(models, runtime)
    factor = models.model_preset.latent_factor
    dataset = DatasetConfig(layout="webdataset", shard_size=samples, filters=["motion>=0.5"])
    generator = torch.Generator().manual_seed(0)
    smallest = min(sizes, key=lambda size: size[0] * size[1])
    frames = VideoRequest(prompt="warm-up", fps=fps).num_frames
    say(f"warm-up: one decode of {frames} frames at {smallest[0]}x{smallest[1]}")
    decode(torch.randn(frames, LATENT_CHANNELS, smallest[1] // factor, smallest[0] // factor, generator=generator))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for width, height in sizes:
            request = VideoRequest(prompt="a red car drifting on a mountain road", width=width, height=height,
                                   fps=fps, seed=0)
            latents = torch.randn(request.num_frames, LATENT_CHANNELS, height // factor, width // factor,
                                  generator=generator)
            say(f"{width}x{height}: decoding {request.num_frames} frames ({repeats} call(s))")
            decode_s, frames = _timed(repeats, decode, latents, request=request)
            video = Video(request, frames)
            encode_s, encoded = _timed(repeats, video.encode, "mp4")
            key = video_id(request, models.version)
            metadata = video_metadata(video, row_id="bench", video_id=key, model_version=models.version,
                                      video_format="mp4", seconds={"decode": decode_s}, placement={}, uri="")
            quality_s, sample = _timed(max(3, repeats), dataset_sample, video, metadata, dataset,
                                         encoded=encoded)
            copies = [Sample(key=f"{i:032x}", video=encoded, metadata={**sample.metadata, "video_id": f"{i:032x}"},
                             caption=sample.caption) for i in range(samples)]
            shard_s = float("inf")
            for attempt in range(repeats):  # a fresh root each time: a committed shard is not written again
                fs, root = open_fs(f"{out or scratch}/{width}x{height}/{attempt}")
                start = time.perf_counter()
                written = write_samples(fs, root, copies, dataset)
                shard_s = min(shard_s, time.perf_counter() - start)
            results.append({
                "width": width, "height": height, "frames": request.num_frames, "decode_seconds": decode_s,
                "encode_seconds": encode_s, "quality_seconds": quality_s, "shard_seconds_per_sample": shard_s / samples,
                "video_bytes": len(encoded), "shard_bytes": written.shards[0].bytes,
                # None: the stage's own time was too short to measure, so there is no share to report.
                "share": (quality_s + shard_s / samples) / (decode_s + encode_s) if decode_s + encode_s > 0 else None,
            })
    return {"sizes": results, "device": str(torch_device(runtime)), "threads": torch.get_num_threads(),
            "preset": models.preset, "fps": fps, "samples_per_shard": samples, "store": out or "local temporary directory"}


# ---------------------------------------------------------------------------------------------------------
# Command line


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in filter(None, text.split(",")):
        width, _, height = item.partition("x")
        try:
            sizes.append((int(width), int(height or width)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--sizes: {item!r} is not SIZE or WIDTHxHEIGHT") from None
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes: give at least one size, e.g. 128,512")
    return sizes


def add_dataset_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Registers `kvray bench dataset` on `kvray bench`'s subparsers."""
    p = bench_subparsers.add_parser(
        "dataset", help="share of the decode stage's time that quality signals and shard writing add",
        description="Decodes one video per size with the video MoVQ and encodes it (the decode stage's own time), "
                    "then times the quality signals and writing a WebDataset shard with its index part, and prints "
                    "what they add as a share of the stage's own time.")
    p.add_argument("--sizes", type=_sizes, default=[(128, 128), (512, 512)], metavar="SIZE,...",
                   help="frame sizes, SIZE or WIDTHxHEIGHT, multiples of 64 (default 128,512)")
    p.add_argument("--fps", default="medium", choices=list(FPS_PASSES), help="default medium (45 frames)")
    p.add_argument("--samples", type=int, default=16, help="samples in the timed shard (default 16)")
    p.add_argument("--repeats", type=int, default=1, help="timed decodes per size; the fastest counts (default 1)")
    p.add_argument("--out", help="where the shards go (local path or fsspec URI; default a temporary directory)")
    add_preset_option(p)
    add_weights_options(p, default="random")
    add_device_option(p)
    p.set_defaults(run=run_dataset_command)
    return p


def run_dataset_command(args) -> int:
    from pydantic import ValidationError

    from ..config import RuntimeConfig
    from ..config.models import ModelSource
    from ..config.validation import validation_message
    from ..pipeline import VideoRequest

    try:
        for width, height in args.sizes:
            VideoRequest(prompt="size check", width=width, height=height, fps=args.fps)
        if args.samples < 1 or args.repeats < 1:
            raise ValueError("--samples and --repeats must be at least 1")
        models = ModelSource(preset=args.preset, weights=args.weights)
        runtime = RuntimeConfig(device=args.device)
    except ValidationError as err:
        print(f"error: {validation_message(err, 'request')}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = bench_dataset(models, runtime, args.sizes, fps=args.fps, samples=args.samples, repeats=args.repeats,
                           out=args.out, progress=lambda m: print(m, file=sys.stderr, flush=True))
    if any(r["share"] is None for r in result["sizes"]):
        print("error: the decode stage took no measurable time: no share to report", file=sys.stderr)
        return 1
    print(f"device {result['device']} ({result['threads']} threads); preset {result['preset']}, fps {result['fps']}; "
          f"a shard of {result['samples_per_shard']} samples on {result['store']}")
    print(f"  {'size':<10}{'decode s':>10}{'encode s':>10}{'quality s':>11}{'shard s/sample':>16}{'share':>9}"
          f"{'mp4 MB':>8}")
    for r in result["sizes"]:
        size = f"{r['width']}x{r['height']}"
        print(f"  {size:<10}{r['decode_seconds']:>10.3f}{r['encode_seconds']:>10.3f}{r['quality_seconds']:>11.4f}"
              f"{r['shard_seconds_per_sample']:>16.4f}{r['share']:>9.2%}{r['video_bytes'] / 1e6:>8.2f}")
    at_512 = [r["share"] for r in result["sizes"] if (r["width"], r["height"]) == (512, 512)]
    if at_512:
        verdict = "met" if at_512[0] <= GOAL_SHARE else "NOT met"
        print(f"goal: quality + shards <= {GOAL_SHARE:.0%} of the decode stage at 512x512: {verdict}")
    return 0
