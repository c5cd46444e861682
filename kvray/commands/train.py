"""`kvray train`: the command line of the training recipe (kvray/training), one resumable step per network."""

from __future__ import annotations

import sys

from ..training.recipe import NEEDS, RECIPE, STEP_NAMES

EXPORT = "export"
ALL = "all"


def add_parser(subparsers) -> None:
    steps = ", ".join(f"{name} (needs {', '.join(NEEDS[name]) or 'nothing'}; {RECIPE[name].steps} steps)" for name in STEP_NAMES)
    p = subparsers.add_parser(
        "train", help="train the networks of a preset on the toy world, one resumable step per network",
        description=f"Steps, in order: {steps}. `all` runs every step that is not finished, in order; `export` writes "
                    "the trained networks (EMA weights) to --to, by default in half precision, for --weights. A step "
                    "resumes from WORK/STEP/checkpoint.pt; WORK/STEP/loss.csv has its loss and validation curves. "
                    "docs/training.md has the recipe and the commands that made the shipped weights.")
    p.add_argument("step", choices=[*STEP_NAMES, ALL, EXPORT])
    p.add_argument("--work", required=True, help="work directory: checkpoints, loss logs and weights/ (local path)")
    p.add_argument("--preset", default="toy", help="network sizes (default toy)")
    p.add_argument("--steps", type=int, help="optimiser steps of this step (default: the recipe's; `all` runs the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="data and noise seed (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ... (bfloat16 autocast on a GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute U-Net activations in the backward pass: less memory, about a third more compute")
    p.add_argument("--to", help="export: where the weights go (default WORK/export)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="export: the weights' dtype (default float16)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from ..training.loop import TrainConfig, export_work, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step == EXPORT:
        written = export_work(args.work, args.to or f"{args.work}/export", getattr(torch, args.dtype))
        print(f"wrote {len(written)} files to {args.to or args.work + '/export'}")
        return 0
    names = list(STEP_NAMES) if args.step == ALL else [args.step]
    for name in names:
        recipe = RECIPE[name]
        try:
            config = TrainConfig(step=name, work=args.work, preset=args.preset, seed=args.seed, device=args.device,
                                 steps=(args.steps if args.step != ALL else None) or recipe.steps,
                                 lr=args.lr or recipe.lr, gradient_checkpointing=args.gradient_checkpointing)
            train(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0
