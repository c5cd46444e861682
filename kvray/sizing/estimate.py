"""Every stage at full size without a GPU: FLOPs, peak device memory, bytes out; and the planner's cost
profiles made from them (`kvray bench estimate` prints them, the renderer plans kv11 jobs with them).

The four stages run their own code (`EncodeText`, `Keyframes`, `Interpolate`, `Decode`, built with
random weights as `kvray bench stages` builds them) under a `DryRun` (`meter.py`): fake tensors, no
memory, no compute, so that a shape or dtype error anywhere at full size fails here as it would on a
GPU. Each stage runs alone, as a renderer actor runs it: its networks are built, it is called for a
batch of requests fed by the previous stage's outputs, then it is dropped. Per stage:

* FLOPs per video at the requests' own step counts (official 50 / 50 / 10): every sampling loop
  runs all its steps; a network call that repeats an earlier one (same shapes) is credited with the
  FLOPs and memory of the first instead of being traced again (`kvray.sizing.meter.instrument`).
* peak device memory: weights + activations + the stage's inputs and outputs on the device, the
  high-water mark of live tensor storage (not counted: kernel workspaces, the allocator's rounding,
  the CUDA context);
* bytes a video hands to the next stage (the renderer's payload tensors; nothing after decoding).

Dtypes: "auto" is what a GPU run uses (the official U-Nets fp16, text encoder and MoVQs fp32), not
the CPU's float32. The kv11 tokenizer (Flan-UL2's) is not needed: a byte tokenizer stands in, with
prompts of `prompt_tokens` tokens (128 by default, the longest context the networks take).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass, field

from ..config.gpus import DEFAULT_CONTEXT_GIB, DEFAULT_GPU, DEFAULT_UTILISATION, get_gpu
from ..config.runtime import FAST_GPU_DTYPE, NETWORKS, OFFICIAL_GPU_DTYPES
from ..config.stages import STAGE_NETWORKS, STAGES
from ..options import add_preset_option

# Named precisions: per-network dtypes (RuntimeConfig field values).
PRECISIONS: dict[str, dict[str, str]] = {
    "official": dict(OFFICIAL_GPU_DTYPES),
    "bf16": dict.fromkeys(NETWORKS, FAST_GPU_DTYPE),
}
DEFAULT_PROMPT_TOKENS = 128
GIB = 2**30


@dataclass
class StageEstimate:
    stage: str
    videos: int  # videos per call
    flops: dict[tuple[str, str], int]  # (dtype, kind) -> FLOPs of the call (all its videos)
    weights_bytes: int
    peak_bytes: int  # weights + activations + inputs and outputs, the call's high-water mark
    output_bytes: int  # per video, handed to the next stage
    seconds: float  # wall time of the dry run itself
    dtypes: dict[str, str] = field(default_factory=dict)
    calls: dict = field(default_factory=dict)  # (network, entry point, input shape) -> meter.Calls

    @property
    def flops_per_video(self) -> float:
        return sum(self.flops.values()) / self.videos

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def resolved_dtypes(dtypes: dict[str, str] | None = None) -> dict[str, str]:
    """Every network's dtype name for a GPU run: the given ones, "auto" (or missing) as a GPU resolves it."""
    official = PRECISIONS["official"]
    given = dtypes or {}
    return {n: official[n] if given.get(n, "auto") == "auto" else given[n] for n in NETWORKS}


def estimate_runtime(dtypes: dict[str, str] | None = None, batch_invariant: bool = True):
    """The RuntimeConfig a dry run uses: the simulated device and explicit dtypes. `batch_invariant` (the
    renderer's default): one request per network call, so a batch's peak is about one request's."""
    from ..config import RuntimeConfig
    from .meter import SIMULATED_DEVICE

    return RuntimeConfig(device=str(SIMULATED_DEVICE), batch_invariant=batch_invariant,
                         **{f"{n}_dtype": d for n, d in resolved_dtypes(dtypes).items()})


def request_batch(request, batch: int, prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> list:
    """`batch` copies of a request with distinct seeds and prompts (every scene's) of `prompt_tokens` byte
    tokens (the end-of-text token included)."""
    def prompt(i: int, scene: int) -> str:
        head = f"{i}.{scene} "
        return (head + "x" * max(0, prompt_tokens - 1 - len(head)))[: max(1, prompt_tokens - 1)]

    out = []
    for i in range(batch):
        update = {"seed": (request.seed or 0) + i, "prompt": prompt(i, 0)}
        if request.scenes:
            update["scenes"] = tuple(prompt(i, s) for s in range(request.num_scenes))
        out.append(request.model_copy(update=update))
    return out


def stand_in_images(requests) -> list:
    """A first frame of the video's size for each request that has one (image2video, animation from an image)."""
    from PIL import Image

    return [Image.new("RGB", (r.width, r.height)) if r.image else None for r in requests]


def estimate_stages(preset: str, requests, dtypes: dict[str, str] | None = None, **kwargs) -> dict[str, StageEstimate]:
    """Each stage alone under a dry run for one batch of `requests` (see `request_batch`)."""
    return estimate_cases(preset, [requests], dtypes, **kwargs)[0]


def estimate_cases(preset: str, cases, dtypes: dict[str, str] | None = None, *,
                   stages: tuple[str, ...] = tuple(STAGE_NETWORKS), replay: bool = True,
                   batch_invariant: bool = True) -> list[dict[str, StageEstimate]]:
    """Each stage under a dry run for every case (a batch of requests), as an actor serves batch after
    batch: the stage is built once, called for each case in turn, then dropped, and the next stage is
    fed each case's outputs. `stages`: run up to the last of these (each stage feeds the next).

    A case's peak: the stage's weights + the case's inputs + the call's high-water mark above what was
    live before it (other cases' outputs, kept for the next stage, do not count)."""
    import transformers

    from ..config.models import ModelSource
    from ..pipeline.stages import Decode, EncodeText, Interpolate, Keyframes, text_tensors

    models = ModelSource(preset=preset, weights="random")  # the weights' values do not matter: there are none
    runtime = estimate_runtime(dtypes, batch_invariant)
    order = list(STAGE_NETWORKS)
    last = max(order.index(s) for s in stages)
    runs = _StageRuns(cases, resolved_dtypes(dtypes), replay)
    run = runs.run

    tokenizer = transformers.ByT5Tokenizer()
    texts = [t for t, _ in run(
        "text", lambda: EncodeText.from_source(models, runtime, tokenizer=tokenizer),
        lambda w, i: w([r.prompts for r in cases[i]]),
        lambda i: [], lambda i, out: _mean(_nbytes(text_tensors(t).values()) for t in out[0]))]
    payloads = [[t for text in case for t in text_tensors(text).values()] for case in texts]
    if last >= 1:
        keyframes = run(
            "keyframes", lambda: Keyframes.from_source(models, runtime),
            lambda w, i: w(cases[i], texts[i], stand_in_images(cases[i])), lambda i: payloads[i],
            lambda i, out: _mean(_nbytes(text_tensors(t).values()) + k.nbytes for t, k in zip(texts[i], out)))
    if last >= 2:
        videos = run(
            "interpolate", lambda: Interpolate.from_source(models, runtime),
            lambda w, i: w(cases[i], texts[i], keyframes[i]), lambda i: payloads[i] + list(keyframes[i]),
            lambda i, out: _mean(v.nbytes for v in out))
    if last >= 3:
        # Only the frames' shapes are kept: the frames themselves (host memory, black) go at once.
        run("decode", lambda: Decode.from_source(models, runtime),
            lambda w, i: [w(v, request=r).shape for v, r in zip(videos[i], cases[i])], lambda i: list(videos[i]),
            lambda i, out: 0)
    return [{s: case[s] for s in stages} for case in runs.results]


class _StageRuns:
    """The stages of `estimate_cases` under one dry run, each measured by a meter: built once, called per case."""

    def __init__(self, cases, network_dtypes: dict[str, str], replay: bool):
        from .meter import DryRun

        self.cases, self.network_dtypes, self.replay = cases, network_dtypes, replay
        self.results: list[dict[str, StageEstimate]] = [{} for _ in cases]
        self.dry = DryRun()

    def run(self, stage: str, build, call, inputs, output_bytes) -> list:
        """`call(worker, i)`: case i's outputs; `inputs(i)`: the tensors case i is fed; `output_bytes(i, out)`:
        what a video of case i hands on."""
        from torch import nn

        from .meter import Meter, instrument

        outs = []
        with self.dry.fake, Meter() as meter:
            start = time.perf_counter()
            worker = build()
            for module in vars(worker).values():
                if isinstance(module, nn.Module):
                    instrument(module, meter, type(module).__name__, replay=self.replay)
            weights, build_seconds = meter.live, time.perf_counter() - start
            for index in range(len(self.cases)):
                out, estimate = self._case(stage, meter, weights, index, worker, call, inputs, output_bytes)
                estimate.seconds += build_seconds  # the stage's build counts once, in its first case
                self.results[index][stage] = estimate
                outs.append(out)
                build_seconds = 0.0
            del worker
        return outs

    def _case(self, stage: str, meter, weights: int, index: int, worker, call, inputs, output_bytes) -> tuple:
        """Case `index` called under the meter: its outputs and its estimate."""
        from .meter import Calls

        start = time.perf_counter()
        flops, live = Counter(meter.flops), meter.live
        before = {k: (c.count, c.flops) for k, c in meter.calls.items()}
        meter.reset_peak()
        out = call(worker, index)
        flops = Counter(meter.flops) - flops
        return out, StageEstimate(
            stage=stage, videos=len(self.cases[index]), flops=dict(flops), weights_bytes=weights,
            peak_bytes=weights + _nbytes(inputs(index)) + meter.peak - live, output_bytes=output_bytes(index, out),
            seconds=time.perf_counter() - start, dtypes={n: self.network_dtypes[n] for n in STAGE_NETWORKS[stage]},
            calls={k: Calls(c.count - before.get(k, (0, 0))[0], c.flops - before.get(k, (0, 0))[1])
                   for k, c in meter.calls.items() if c.count > before.get(k, (0, 0))[0]})


def _nbytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def _mean(values) -> int:
    values = list(values)
    return round(sum(values) / len(values)) if values else 0


# ---------------------------------------------------------------------------------------------------------
# Cost profiles from estimates

MIN_SECONDS = 1e-6  # a stage with no work (interpolation at fps low) still has a positive cost in a profile


def alternative_dtypes(stage: str, dtypes: dict[str, str]) -> list[dict[str, str]]:
    """Smaller precisions worth suggesting for a stage: bfloat16 for its fp32 networks, and weight-only
    int8 for the text encoder (not fp16: T5 encoders are known to overflow in it)."""
    options = []
    full = [n for n in STAGE_NETWORKS[stage] if dtypes[n] == "float32"]
    if full:
        options.append(dict.fromkeys(full, "bfloat16"))
    if stage == "text" and dtypes["text_encoder"] != "int8":
        options.append({"text_encoder": "int8"})
    return options


def dtype_setting(dtypes: dict[str, str]) -> str:
    """`--dtype` spelling of per-network dtypes: text_encoder=int8,..."""
    return ",".join(f"{n}={d}" for n, d in dtypes.items())


# (preset, request JSON, stage, the stage's network dtypes, batch size, prompt tokens) -> StageEstimate. A stage's
# figures depend on its own networks' dtypes only: what it is fed (float32 contexts and latents) does not change.
_ESTIMATES: dict[tuple, StageEstimate] = {}


def cached_estimate(preset: str, request, dtypes: dict[str, str] | None = None, batch_sizes: dict[str, int] | None = None,
                    stage: str | None = None, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                    batch_invariant: bool = True) -> dict[str, StageEstimate]:
    """Every stage (or one) at its own batch size (default: the deployment's defaults); a stage estimated once
    in this process for the same request, dtypes and batch size is not estimated again."""
    from ..config.job import Deployment

    dtypes = resolved_dtypes(dtypes)
    sizes = {s: (batch_sizes or {}).get(s, Deployment().stage(s).batch_size) for s in STAGE_NETWORKS}
    request_json = request.model_dump_json()

    def key(s: str) -> tuple:
        return (preset, request_json, s, tuple(dtypes[n] for n in STAGE_NETWORKS[s]), sizes[s], prompt_tokens,
                batch_invariant)

    wanted = (stage,) if stage else tuple(STAGE_NETWORKS)
    missing = [s for s in wanted if key(s) not in _ESTIMATES]
    heavy = [s for s in missing if s != "text"]
    if heavy:
        batches = sorted({sizes[s] for s in heavy})
        runs = estimate_cases(preset, [request_batch(request, b, prompt_tokens) for b in batches], dtypes,
                              stages=tuple(heavy), batch_invariant=batch_invariant)
        for s in heavy:
            _ESTIMATES[key(s)] = runs[batches.index(sizes[s])][s]
    if "text" in missing:
        _ESTIMATES[key("text")] = estimate_stages(preset, request_batch(request, sizes["text"], prompt_tokens), dtypes,
                                                  stages=("text",), batch_invariant=batch_invariant)["text"]
    return {s: _ESTIMATES[key(s)] for s in wanted}


def estimated_profile(preset: str, request, *, dtypes: dict[str, str] | None = None, gpu: str = DEFAULT_GPU,
                      gpu_memory_gib: float | None = None, utilisation: float = DEFAULT_UTILISATION,
                      batch_sizes: dict[str, int] | None = None, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                      batch_invariant: bool = True):
    """A planner cost profile from the dry run: seconds on a named GPU from each stage's FLOPs (at
    `utilisation` of the GPU's peaks), peak memory from the accountant. For a stage that does not fit
    `gpu_memory_gib` (default: the GPU's) with a CUDA context, its peak in smaller precisions is added
    (`StageCost.alternatives`), which the planner names when it refuses the plan."""
    from ..config.costs import CostProfile, StageCost

    spec = get_gpu(gpu)
    memory = gpu_memory_gib or spec.memory_gib
    dtypes = resolved_dtypes(dtypes)
    estimates = cached_estimate(preset, request, dtypes, batch_sizes, prompt_tokens=prompt_tokens,
                                batch_invariant=batch_invariant)
    stages = {}
    for s, e in estimates.items():
        alternatives = {}
        if e.peak_gib + DEFAULT_CONTEXT_GIB > memory:
            for option in alternative_dtypes(s, dtypes):
                other = cached_estimate(preset, request, {**dtypes, **option}, batch_sizes, stage=s,
                                        prompt_tokens=prompt_tokens, batch_invariant=batch_invariant)[s]
                alternatives[dtype_setting(option)] = round(other.peak_gib, 3)
        per_video = {k: v / e.videos for k, v in e.flops.items()}
        stages[s] = StageCost(seconds=max(MIN_SECONDS, spec.seconds(per_video, utilisation)),
                              peak_memory_gib=round(e.peak_gib, 3), output_bytes=e.output_bytes,
                              batch_size=e.videos, alternatives=alternatives)
    return CostProfile(
        stages=stages, device=f"{spec.name} (estimated)", device_memory_gib=memory,
        meta={"estimate": True, "preset": preset, "request": request.model_dump(mode="json", exclude_none=True),
              "dtypes": dtypes, "gpu": gpu, "utilisation": utilisation, "prompt_tokens": prompt_tokens,
              "batch_invariant": batch_invariant,
              "tflop_per_video": {s: round(e.flops_per_video / 1e12, 3) for s, e in estimates.items()}},
    )


def planning_request(preset: str, *, width: int | None = None, height: int | None = None, fps: str = "medium",
                     motion: str = "medium", mode: str = "text2video", steps: int | None = None,
                     interpolation_steps: int | None = None):
    """The request a profile is estimated for: text2video by default (the first frame is drawn; image2video
    skips it), the preset's size unless given."""
    from ..config import get_preset
    from ..requests import VideoRequest
    from ..requests.request import default_size

    sizes = default_size(mode, (get_preset(preset).default_width, get_preset(preset).default_height))
    fields = {"prompt": "x", "seed": 0, "mode": mode, "width": width or sizes[0], "height": height or sizes[1],
              "fps": fps, "motion": motion, "steps": steps, "interpolation_steps": interpolation_steps}
    if mode == "image2video":
        fields["image"] = "stand-in.png"
    if mode == "animation":
        fields.update(camera="zoom-in", fps="low")
    return VideoRequest(**{k: v for k, v in fields.items() if v is not None})


def job_profile(job):
    """The profile the renderer plans a job's pools with when the job gives none: estimated for the job's
    default request (its `defaults`), precisions and batching (`runtime`), batch sizes (`deployment`) and GPU (`gpu`,
    `gpu_memory_gib`)."""
    defaults = job.defaults
    request = planning_request(job.models.preset, width=defaults.width, height=defaults.height, fps=defaults.fps,
                               motion=defaults.motion, steps=defaults.steps,
                               interpolation_steps=defaults.interpolation_steps)
    dtypes = {n: job.runtime.dtype_name(n, on_gpu=True) for n in NETWORKS}
    return estimated_profile(job.models.preset, request, dtypes=dtypes, gpu=job.gpu or DEFAULT_GPU,
                             gpu_memory_gib=job.gpu_memory_gib, batch_invariant=job.runtime.batch_invariant,
                             batch_sizes={s: job.deployment.stage(s).batch_size for s in STAGES})


# ---------------------------------------------------------------------------------------------------------
# The matrix of requests users ask for

MATRIX_SIZES = ((512, 512), (640, 384), (384, 640), (2048, 2048))  # the official ones and the largest supported
ANIMATION_SIZES = ((640, 640), (2048, 2048))
MATRIX_FPS = ("low", "medium", "high")
MOVIE_SCENES = 3


@dataclass(frozen=True)
class Case:
    mode: str  # text2video, image2video, animation, movie
    width: int
    height: int
    fps: str
    batch: int

    @property
    def label(self) -> str:
        fps = "" if self.mode == "animation" else f" fps {self.fps}"
        return f"{self.mode} {self.width}x{self.height}{fps} x{self.batch}"

    def request(self, steps: int | None = None, interpolation_steps: int | None = None):
        from ..requests import VideoRequest

        fields = {"prompt": "x", "seed": 0, "width": self.width, "height": self.height, "steps": steps,
                  "interpolation_steps": interpolation_steps}
        if self.mode == "animation":
            fields.update(mode="animation", camera="zoom-in")
        else:
            fields.update(fps=self.fps, mode="image2video" if self.mode == "image2video" else "text2video")
            if self.mode == "image2video":
                fields["image"] = "stand-in.png"
            if self.mode == "movie":
                fields["scenes"] = ["x", *(f"scene {i}" for i in range(1, MOVIE_SCENES))]
        return VideoRequest(**{k: v for k, v in fields.items() if v is not None})


MODES = ("text2video", "image2video", "movie", "animation")


def matrix(batches=(1,), modes=MODES, sizes=MATRIX_SIZES, animation_sizes=ANIMATION_SIZES, fps=MATRIX_FPS) -> list[Case]:
    """Every mode x fps x size x batch size (animation: its own sizes, no fps)."""
    cases = [Case(mode, w, h, f, b) for mode in modes if mode != "animation" for w, h in sizes for f in fps
             for b in batches]
    if "animation" in modes:
        cases += [Case("animation", w, h, "low", b) for w, h in animation_sizes for b in batches]
    return cases


def estimate_matrix(preset: str, cases: list[Case], dtypes=None, *, steps: int | None = None,
                    interpolation_steps: int | None = None, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                    replay: bool = True) -> list[dict[str, StageEstimate]]:
    """Every case through the four stages under one dry run per stage (see `estimate_cases`)."""
    batches = [request_batch(c.request(steps, interpolation_steps), c.batch, prompt_tokens) for c in cases]
    return estimate_cases(preset, batches, dtypes, replay=replay)


# ---------------------------------------------------------------------------------------------------------
# What an estimate is for, on the command line

def size_argument(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 640x384") from None


def dtype_argument(text: str) -> dict[str, str]:
    """argparse type of `--dtype NETWORK=DTYPE,...`."""
    from ..config.runtime import parse_dtype_setting

    try:
        return parse_dtype_setting(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None

def add_profile_options(parser) -> None:
    """What an estimated profile is for: shared by `kvray bench estimate` and `kvray plan`."""
    from ..config.gpus import GPUS

    add_preset_option(parser, default="kv11")
    parser.add_argument("--fps", default="medium", choices=list(MATRIX_FPS), help="default medium")
    parser.add_argument("--size", type=size_argument, help="WIDTHxHEIGHT (default: the preset's; 640x640 for a kv11 animation)")
    parser.add_argument("--dtype", type=dtype_argument, default={}, metavar="NETWORK=DTYPE,...",
                        help="per-network dtypes (default the official GPU ones: U-Nets fp16, text encoder and MoVQs "
                             "fp32; text_encoder=int8 is weight-only int8)")
    parser.add_argument("--gpu", default=DEFAULT_GPU, choices=sorted(GPUS),
                        help=f"whose datasheet speeds (and memory) turn FLOPs into seconds (default {DEFAULT_GPU})")
    parser.add_argument("--utilisation", type=float, default=DEFAULT_UTILISATION,
                        help=f"share of the GPU's peak TFLOP/s reached (default {DEFAULT_UTILISATION})")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help=f"tokens per prompt, end token included (default {DEFAULT_PROMPT_TOKENS}, the longest context)")
