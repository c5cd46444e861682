"""`kvray plan`: the planner's pools for a cost profile, measured or estimated, with a job deployment to paste."""

from __future__ import annotations

import argparse
import json
import sys

from ..config.costs import CostError, CostProfile, parse_costs
from ..distributed.planner import (
    DEFAULT_MAX_SHARE,
    DEFAULT_SLACK,
    DEFAULT_TOLERANCE,
    equal_plan,
    plan,
    plan_summary,
    suggest_batch_sizes,
)
from ..sizing.estimate import add_profile_options, estimated_profile, planning_request


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="pool size and GPUs per actor for each stage, from measured or estimated stage costs",
        description="Chooses each stage's actors and GPUs per actor (1/k of a GPU, never beyond a GPU's memory), "
                    "and prints the plan, its predicted videos/s and the bound N / sum(costs). Without --costs, "
                    "the profile is estimated for the preset on a named GPU (`kvray bench estimate`: a dry run of "
                    "the full-size stages; seconds from FLOPs at a share of the GPU's peak). A stage whose actor "
                    "does not fit one GPU is refused, with the GPU size or precision that would fit.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, required=True, help="GPUs to plan for")
    p.add_argument("--costs", help="cost profile (JSON from `kvray bench stages` or `kvray bench estimate`) or "
                                   "stage=seconds[@GiB],...; default: estimated for --preset")
    p.add_argument("--gpu-memory", type=float, help="GiB of one GPU (default: the profile's device)")
    add_profile_options(p.add_argument_group("estimated profile (without --costs)"))
    p.add_argument("--max-share", type=int, default=DEFAULT_MAX_SHARE,
                   help=f"most actors on one GPU (default {DEFAULT_MAX_SHARE})")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"throughput given up for fewer actors (default {DEFAULT_TOLERANCE}; 0: throughput alone)")
    p.add_argument("--slack", type=float, default=DEFAULT_SLACK,
                   help=f"extra capacity of every stage but the bottleneck (default {DEFAULT_SLACK}; 0: none)")
    p.add_argument("--max-actors", type=int, help="most actors in all (default: no limit)")
    p.add_argument("--videos", type=int, help="videos in the run (caps the suggested batch sizes)")
    p.add_argument("--equal", action="store_true", help="also show naive equal pools")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run)


def _plan_costs(args) -> CostProfile:
    if args.costs:
        return parse_costs(args.costs)
    width, height = args.size or (None, None)
    request = planning_request(args.preset, width=width, height=height, fps=args.fps)
    return estimated_profile(args.preset, request, dtypes=args.dtype, gpu=args.gpu, gpu_memory_gib=args.gpu_memory,
                             utilisation=args.utilisation, prompt_tokens=args.prompt_tokens)


def run(args) -> int:
    from pydantic import ValidationError

    from ..config.validation import validation_message

    try:
        costs = _plan_costs(args)
        chosen = plan(costs, args.gpus, args.gpu_memory, max_share=args.max_share, tolerance=args.tolerance,
                      slack=args.slack, max_actors=args.max_actors)
    except ValidationError as err:
        print(f"error: {validation_message(err, 'request')}", file=sys.stderr)
        return 2
    except (CostError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = suggest_batch_sizes(chosen, costs, videos=args.videos)
    if args.json:
        print(json.dumps({**plan_summary(chosen), "batch_sizes": sizes}, indent=2))
        return 0
    if costs.meta.get("estimate"):
        print(f"profile: estimated for {costs.meta['preset']} {_request_words(costs.meta['request'])} on "
              f"{costs.device} at {costs.meta['utilisation']:g} of its peak TFLOP/s; peak GiB per actor "
              + ", ".join(f"{s} {c.peak_memory_gib:.1f}" for s, c in costs.stages.items()))
    for line in chosen.lines():
        print(line)
    print("job deployment (YAML):")
    print("deployment:")
    for s, stage in chosen.stages.items():
        print(f"  {s}: {{actors: {stage.actors}, gpus: {stage.gpus_per_actor:g}, batch_size: {sizes[s]}}}")
    if args.equal:
        try:
            print("\n".join(equal_plan(costs, args.gpus).lines()))
        except ValueError as err:
            print(f"equal pools: {err}")
    return 0


def _request_words(request: dict) -> str:
    return f"{request['width']}x{request['height']} fps {request['fps']} {request['mode']}"
