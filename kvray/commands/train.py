"""`kvray train`: the command line of the training recipe (kvray/training), one resumable step per network."""

from __future__ import annotations

import sys

from ..options import add_storage_options
from ..training.recipe import LORA, LORA_RECIPE, NEEDS, RECIPE, STEP_NAMES

EXPORT = "export"
ALL = "all"


def add_parser(subparsers) -> None:
    steps = ", ".join(f"{name} (needs {', '.join(NEEDS[name]) or 'nothing'}; {RECIPE[name].steps} steps)" for name in STEP_NAMES)
    p = subparsers.add_parser(
        "train", help="train the networks of a preset on the toy world, one resumable step per network",
        description=f"Steps, in order: {steps}. `all` runs every step that is not finished, in order; `export` writes "
                    "the trained networks (EMA weights) to --to, by default in half precision, for --weights. A step "
                    "resumes from WORK/STEP/checkpoint.pt; WORK/STEP/loss.csv has its loss and validation curves. "
                    "docs/training.md has the recipe and the commands that made the shipped weights. "
                    f"`lora` trains a LoRA adapter on the keyframe U-Net of --base that teaches --concept "
                    f"({LORA_RECIPE.steps} steps); it is written to WORK/adapter, for `--lora` of generate, render and submit.")
    p.add_argument("step", choices=[*STEP_NAMES, ALL, EXPORT, LORA])
    p.add_argument("--work", required=True, help="work directory: checkpoints, loss logs and weights/ (local path)")
    p.add_argument("--preset", default="toy", help="network sizes (default toy)")
    p.add_argument("--steps", type=int, help="optimiser steps of this step (default: the recipe's; `all` runs the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="data and noise seed (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ... (bfloat16 autocast on a GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute U-Net activations in the backward pass: less memory, about a third more compute")
    lora = p.add_argument_group("lora")
    lora.add_argument("--concept", help="the toy-world concept the adapter teaches: star")
    lora.add_argument("--base", help="the weights the adapter is trained on (default: the shipped toy weights)")
    lora.add_argument("--rank", type=int, default=8, help="the adapter's rank (default 8)")
    lora.add_argument("--lora-convs", action="store_true",
                      help="adapt the ResNet and feed-forward 1x1 convolutions too, not only the attention projections")
    parallel = p.add_argument_group("data-parallel on Ray Train")
    parallel.add_argument("--workers", type=int,
                          help="train the step on N Ray Train workers (gradients averaged; global batch N x the step's)")
    parallel.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default 0: CPU, gloo)")
    parallel.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (and torch threads) per worker (default 1)")
    parallel.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    parallel.add_argument("--storage", help="where Ray Train keeps checkpoints: path or fsspec URI, s3://... (default WORK/ray)")
    add_storage_options(parallel)
    p.add_argument("--to", help="export: where the weights go (default WORK/export)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="export: the weights' dtype (default float16)")
    p.set_defaults(run=run)


def _lora_settings(args) -> dict:
    from ..config.models import ModelSource

    base = args.base or ModelSource(preset=args.preset).resolved_weights
    return {"concept": args.concept, "base": base, "lora_rank": args.rank, "lora_convs": args.lora_convs}


def _train(config, args) -> dict:
    if not args.workers:
        from ..training.loop import train

        return train(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    from ..distributed.train_ray import train_on_ray
    from ..io.storage_options import parse_storage_options
    from ..training.loop import ADAPTER_DIR

    result = train_on_ray(config, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                          cpus_per_worker=args.cpus_per_worker, address=args.address, storage=args.storage,
                          storage_options=parse_storage_options(args.storage_option), verbose=True)
    print(f"{config.step}: finished on {args.workers} workers; last checkpoint {result['checkpoint']}", file=sys.stderr)
    return {"adapter": f"{config.work}/{ADAPTER_DIR}", **result}


def run(args) -> int:
    import torch

    from ..training.loop import TrainConfig, export_work

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step == EXPORT:
        written = export_work(args.work, args.to or f"{args.work}/export", getattr(torch, args.dtype))
        print(f"wrote {len(written)} files to {args.to or args.work + '/export'}")
        return 0
    names = list(STEP_NAMES) if args.step == ALL else [args.step]
    for name in names:
        recipe = LORA_RECIPE if name == LORA else RECIPE[name]
        try:
            config = TrainConfig(step=name, work=args.work, preset=args.preset, seed=args.seed, device=args.device,
                                 steps=(args.steps if args.step != ALL else None) or recipe.steps,
                                 lr=args.lr or recipe.lr, gradient_checkpointing=args.gradient_checkpointing,
                                 **(_lora_settings(args) if name == LORA else {"concept": args.concept}))
            summary = _train(config, args)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.step == LORA:
        print(f"adapter: {summary['adapter']} (use it with --lora {summary['adapter']}[:SCALE])")
    return 0
