"""The training loop every step shares: AdamW, EMA, resumable checkpoints, a loss log, exports.

A work directory holds, per step, `{step}/checkpoint.pt` (weights, EMA, optimiser, step: a killed run
resumes exactly, since a batch is a function of (seed, step)), `{step}/loss.csv` (written as training
goes) and, shared, `weights/`: each finished or checkpointed step's EMA networks in kvray's converted
format, which later steps read and `--weights` serves.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..config.models import TOY_WEIGHTS_VERSION_FILE
from ..toyworld import CONCEPT_SHAPES
from ..weights.convert import write_converted
from ..weights.digest import update_with_tensors
from .data import ToyData
from .recipe import LORA, NEEDS
from .run import CHECKPOINT, LocalRun
from .steps import STEPS, Context

log = logging.getLogger(__name__)

WEIGHTS_DIR = "weights"
ADAPTER_DIR = "adapter"  # a `lora` step's adapter, in the work directory


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    step: str
    work: str
    preset: str = "toy"
    steps: int = Field(default=1000, ge=1)
    batch_size: int | None = Field(default=None, ge=1, description="None: the step's own (clips or images per batch)")
    lr: float = Field(default=3e-4, gt=0)
    warmup: int = Field(default=100, ge=0)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    seed: int = 0
    size: int = Field(default=64, ge=32)
    checkpoint_every: int = Field(default=200, ge=1)
    validate_every: int = Field(default=200, ge=1)
    log_every: int = Field(default=20, ge=1)
    device: str = "cpu"
    # Recompute each U-Net level's activations in the backward pass instead of keeping them: about a third
    # more compute for a fraction of the activation memory (full-size U-Nets).
    gradient_checkpointing: bool = False
    # Where finished networks are read from (default WORK/weights): the base model of a `lora` step.
    base: str | None = None
    # `lora` only: the concept taught (a toy-world concept shape) and the adapter's rank and targets.
    concept: str | None = None
    lora_rank: int = Field(default=8, ge=1)
    lora_convs: bool = False


class EMA:
    """Exponential moving average of trained tensors, with the usual warm-up of the decay."""

    def __init__(self, tensors: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in tensors.items()}

    def update(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for key, value in tensors.items():
                if value.is_floating_point():
                    self.shadow[key].lerp_(value.detach(), 1 - decay)
                else:
                    self.shadow[key].copy_(value)


def enable_gradient_checkpointing(module: torch.nn.Module) -> int:
    """Wraps every U-Net level (`down_samples`, `up_samples`) of `module` in activation checkpointing;
    returns how many were wrapped (0 for networks without levels, e.g. the MoVQ)."""
    from torch.utils.checkpoint import checkpoint

    levels = [*getattr(module, "down_samples", []), *getattr(module, "up_samples", [])]
    for level in levels:
        level.forward = partial(checkpoint, level.forward, use_reentrant=False)
    return len(levels)


def export_work(work: str, dst: str, dtype: torch.dtype) -> list[str]:
    """Every trained network of a work directory (its EMA weights) to `dst` in `dtype`: what ships."""
    from ..weights.networks import NETWORKS, read_converted
    from ..weights.source import WeightsSource

    folder = Path(work) / WEIGHTS_DIR
    untrained = [name for name in NETWORKS if not (folder / f"{name}.safetensors").is_file()]
    if untrained:
        raise FileNotFoundError(f"{', '.join(untrained)} not trained in {work}: run `kvray train all --work {work}` first")
    source = WeightsSource(str(folder))
    written = []
    for name in NETWORKS:
        config, state, extras = read_converted(source, name)
        arch = json.loads(source.path(f"{name}.json").read_text())
        written += write_converted(dst, name, arch["preset"], config, state, extras, dtype=dtype)
    fs, root = fsspec.core.url_to_fs(dst)
    with fs.open(f"{root}/{TOY_WEIGHTS_VERSION_FILE}", "w") as f:
        f.write(weights_digest(fs, root, NETWORKS) + "\n")
    return [*written, f"{dst.rstrip('/')}/{TOY_WEIGHTS_VERSION_FILE}"]


def weights_digest(fs, root: str, names) -> str:
    """What names the weights in video ids, wherever they are installed: every network's architecture and
    tensors (`kvray.weights.digest`)."""
    from safetensors.torch import load

    digest = hashlib.sha256()
    for name in names:
        digest.update(fs.cat_file(f"{root}/{name}.json"))
        update_with_tensors(digest, load(fs.cat_file(f"{root}/{name}.safetensors")))
    return digest.hexdigest()[:16]


def _lr(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then a cosine down to a tenth."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(config: TrainConfig, progress=None, run: LocalRun | None = None) -> dict:
    """Runs (or resumes) one step to `config.steps`; returns a summary. `progress(line)` gets log lines.
    `run`: how checkpoints are kept and steps shared (default one local process)."""
    from ..config.presets import get_preset

    say = progress or log.info
    _check_step(config)
    preset = get_preset(config.preset)
    _check_size(preset, config.size)
    work = Path(config.work)
    folder = work / config.step
    folder.mkdir(parents=True, exist_ok=True)
    run = run or LocalRun(folder)
    device = torch.device(config.device)
    data = ToyData(config.seed, config.size, concept=config.concept, stream_suffix=run.data_stream)
    ctx = Context(preset, data, config.base or str(work / WEIGHTS_DIR), device)
    step_obj = _build_step(config, ctx)
    params = step_obj.parameters()
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    ema = EMA(step_obj.trained_tensors(), config.ema_decay)
    state = run.restore(device)
    start = 0
    if state is not None:
        start = _resume(state, step_obj, optimiser, ema, config)
        say(f"{config.step}: resumed at step {start}")
    else:
        missing = [need for need in NEEDS.get(config.step, ()) if not (work / need / CHECKPOINT).exists()]
        if missing:
            say(f"{config.step}: note: no checkpoint of {', '.join(missing)} in {work}; reading {ctx.weights}")
    say(f"{config.step}: {sum(p.numel() for p in params) / 1e6:.2f}M trained parameters, steps {start} -> {config.steps}"
        + (f", rank {run.rank} of {run.world}" if run.world > 1 else ""))
    log_file = folder / "loss.csv"
    with _loss_log(log_file, start, run.chief) as writer:
        _loop(config, step_obj, optimiser, params, ema, ctx, run, start, writer, say if run.chief else lambda line: None)
    adapter = {"adapter": step_obj.plan.out} if config.step == LORA else {}
    return {"step": config.step, "steps": config.steps, "weights": ctx.weights, "log": str(log_file), **adapter}


def _check_step(config: TrainConfig) -> None:
    if config.step not in STEPS and config.step != LORA:
        raise ValueError(f"unknown training step {config.step!r}; steps in order: {', '.join(STEPS)}, and {LORA}")
    if (config.step == LORA) != (config.concept is not None):
        raise ValueError(f"a concept is what the {LORA} step teaches, and only it: --concept with {LORA}")
    if config.concept is not None and config.concept not in CONCEPT_SHAPES:
        raise ValueError(f"unknown concept {config.concept!r}; the toy world's concepts: {', '.join(CONCEPT_SHAPES)}")


@contextlib.contextmanager
def _loss_log(log_file: Path, start: int, chief: bool):
    """A csv writer of the loss log, continued after the rows up to `start` (None off the chief rank)."""
    if not chief:
        yield None
        return
    new_log = not log_file.exists() or start == 0
    if not new_log:
        _truncate_log(log_file, start)
    with open(log_file, "w" if new_log else "a", newline="") as handle:
        writer = csv.writer(handle)
        if new_log:
            writer.writerow(LOG_COLUMNS)
        yield _Flushing(writer, handle)


LOG_COLUMNS = ["step", "loss", "validation_loss", "lr", "seconds"]


class _Flushing:
    def __init__(self, writer, handle):
        self.writer, self.handle = writer, handle

    def writerow(self, row) -> None:
        self.writer.writerow(row)
        self.handle.flush()


def _loop(config, step_obj, optimiser, params, ema, ctx, run, start, writer, say) -> None:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else contextlib.nullcontext()
    began, window = time.perf_counter(), []
    for step in range(start, config.steps):
        window.append(_optimise(step_obj, optimiser, params, ema, ctx, config, step, autocast, run))
        done = step + 1
        validating = done % config.validate_every == 0 or done == config.steps
        validation = _validate(step_obj, ctx) if validating else None
        logging_now = done % config.log_every == 0 or validating
        checkpointing = done % config.checkpoint_every == 0 or done == config.steps
        metrics = {}
        if logging_now:
            seconds = time.perf_counter() - began
            metrics = {"step": done, "loss": run.mean(sum(window) / len(window)), "lr": _lr(config, step),
                       "seconds": seconds, "samples_per_s": step_obj.batch_size * (done - start) / seconds,
                       **({} if validation is None else {"validation_loss": validation})}
            if writer is not None:
                writer.writerow([done, f"{metrics['loss']:.6f}", "" if validation is None else f"{validation:.6f}",
                                 f"{metrics['lr']:.3g}", f"{seconds:.1f}"])
            extra = "" if validation is None else f", validation {validation:.4f}"
            say(f"{config.step}: step {done}/{config.steps}, loss {metrics['loss']:.4f}{extra}, "
                f"{seconds / (done - start):.2f} s/step")
            window = []
        if logging_now or checkpointing:
            state = partial(_checkpoint, step_obj, optimiser, ema, done, config) if checkpointing and run.chief else None
            run.report({"step": done, **metrics}, state)
        if checkpointing and run.chief:
            step_obj.export(ema.shadow)


def _build_step(config: TrainConfig, ctx: Context):
    if config.step == LORA:
        from .lora_step import AdapterPlan, LoraStep  # peft loads only where an adapter is trained

        step_obj = LoraStep(ctx, AdapterPlan(config.lora_rank, config.lora_convs, str(Path(config.work) / ADAPTER_DIR)))
    else:
        step_obj = STEPS[config.step](ctx)
    if config.batch_size is not None:
        step_obj.batch_size = config.batch_size
    if config.gradient_checkpointing:
        for module in step_obj.networks.values():
            enable_gradient_checkpointing(module)
    return step_obj


def _check_size(preset, size: int) -> None:
    # The U-Nets halve the latent once per level below the first and need exact skips.
    multiple = preset.latent_factor * 2 ** (preset.keyframe_unet.num_levels - 1)
    if size % multiple:
        halvings = preset.keyframe_unet.num_levels - 1
        raise ValueError(f"frames of {size} px do not fit preset {preset.name}: the side must be a multiple "
                         f"of {multiple} (latents 1/{preset.latent_factor} of it, halved {halvings} times)")


def _optimise(step_obj, optimiser, params, ema: EMA, ctx: Context, config: TrainConfig, step: int, autocast,
              run: LocalRun) -> float:
    """One optimiser step at `step` (learning rate, loss under `autocast`, gradients averaged over the run's
    ranks, then clipped, EMA); returns this rank's loss."""
    for group in optimiser.param_groups:
        group["lr"] = _lr(config, step)
    with autocast:
        loss = step_obj.loss(step, ctx.data.generator(config.step, step))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    run.average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimiser.step()
    ema.update(step_obj.trained_tensors(), step)
    return loss.item()


def _truncate_log(log_file: Path, step: int) -> None:
    """Drops the rows logged after the checkpoint a run resumes from: they are logged again."""
    with open(log_file, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [row for row in rows[1:] if int(row[0]) <= step]
    with open(log_file, "w", newline="") as f:
        csv.writer(f).writerows(kept)


# Validation: one fixed batch of held-out combinations, fixed noise, the EMA-free weights of the moment.
VALIDATION_SEED_STEP = 0


@torch.no_grad()
def _validate(step_obj, ctx: Context) -> float:
    for module in step_obj.networks.values():
        module.eval()
    try:
        return float(step_obj.loss(VALIDATION_SEED_STEP, ctx.data.generator("validation", 0, validation=True), validation=True))
    finally:
        for module in step_obj.networks.values():
            module.train()


def _checkpoint(step_obj, optimiser, ema: EMA, step: int, config: TrainConfig) -> dict:
    return {"step": step, "config": config.model_dump(), "tensors": step_obj.trained_tensors(),
            "ema": ema.shadow, "optimiser": optimiser.state_dict()}


def _resume(state: dict, step_obj, optimiser, ema: EMA, config: TrainConfig) -> int:
    stored = state["config"]
    for key in ("step", "preset", "seed", "size", "batch_size", "concept", "lora_rank", "lora_convs"):
        trained_with = stored.get(key, TrainConfig.model_fields[key].default)  # older checkpoints lack the LoRA's
        if trained_with != getattr(config, key):
            raise ValueError(f"the checkpoint of {config.work} was trained with {key}={trained_with!r}, not "
                             f"{getattr(config, key)!r}: use another --work directory or the same settings")
    current = step_obj.trained_tensors()
    bad = sorted(k for k in current if k not in state["tensors"] or state["tensors"][k].shape != current[k].shape)
    if bad:
        raise ValueError(f"the checkpoint of {config.work} does not fit preset {config.preset}: {len(bad)} tensors differ, "
                         f"e.g. {bad[:3]}")
    with torch.no_grad():
        for key, value in current.items():
            value.copy_(state["tensors"][key])
    ema.shadow = {k: v.clone() for k, v in state["ema"].items()}
    optimiser.load_state_dict(state["optimiser"])
    return int(state["step"])
