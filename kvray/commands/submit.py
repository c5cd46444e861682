"""`kvray submit`: a render sent to a running Ray cluster as a Ray job (kvray/distributed/submit.py)."""

from __future__ import annotations

import argparse
import json
import sys

from ..distributed.submit import SubmitError, render_args_from, secrets_from_args, submit
from ..options import add_preset_option, key_value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="render a manifest on a running Ray cluster, as a Ray job",
        description="Submit `python jobs/render.py MANIFEST --out URI ...` as a Ray job, shipping this "
                    "repository as its working_dir, and follow its logs. Relative paths are relative to "
                    "the working dir on the cluster.")
    p.add_argument("manifest", help="Parquet manifest (file, directory or glob) as the cluster sees it: s3://..., "
                   "or a path in the working dir")
    p.add_argument("--out", required=True, help="output root, as the cluster sees it (s3://bucket/run, ...)")
    p.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                   "else RAY_ADDRESS, else a Ray running on this machine)")
    p.add_argument("--working-dir", help="directory or URI shipped as the job's working_dir (default: this "
                   "repository); '' ships nothing (the image holds the code)")
    p.add_argument("--runtime-env-json", type=_runtime_env_json,
                   help="runtime_env as a JSON object, applied over the defaults (pip, env_vars, excludes, ...)")
    p.add_argument("--pip", action="append", help="pip requirement installed for the job (repeatable; "
                   "slow: prefer an image with the dependencies)")
    p.add_argument("--env", action="append", type=key_value, metavar="KEY=VALUE",
                   help="environment variable for the job's driver and workers (repeatable); values travel in a "
                   "bundle Ray does not show, never in the job record")
    p.add_argument("--auth-token", help="the head's token when it uses token authentication "
                   "(default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    p.add_argument("--submission-id", help="job id to use (default: Ray picks raysubmit_...)")
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="print the job id and return once the job is accepted")
    render = p.add_argument_group("render options, passed to `kvray render` on the cluster")
    add_preset_option(render, default=None, help_default="the job file's, else toy")
    render.add_argument("--weights", help="weights: hub repo id, fsspec URL, path on the cluster, or 'random'")
    render.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                        help="LoRA adapter as the cluster sees it (fsspec URL, hub repo id, path in the working dir), "
                             "merged at SCALE (default 1); repeatable")
    render.add_argument("--job", help="RenderJob YAML, as the cluster sees it (e.g. cluster/job-kv11.yaml)")
    render.add_argument("--storage-option", action="append", type=key_value, metavar="KEY=VALUE",
                        help="fsspec option for the manifest and outputs (repeatable); secret ones (key, secret, "
                        "token, password..., KEY=@env:NAME, KEY=@file:PATH) travel in a bundle, not on the entrypoint")
    render.add_argument("--costs", help="cost profile for the planner: stage=seconds,... or a JSON file as the "
                        "cluster sees it (in the working dir)")
    render.add_argument("--gpu-memory", type=float, help="GiB of one GPU, for the planner")
    p.set_defaults(run=run)


def _runtime_env_json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--runtime-env-json is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--runtime-env-json must be a JSON object")
    return value


def run(args) -> int:
    try:
        public, secrets = secrets_from_args(args.storage_option or [], args.env or [])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    render_args = render_args_from(preset=args.preset, weights=args.weights, job=args.job, costs=args.costs,
                                   gpu_memory=args.gpu_memory, storage_options=public, loras=args.lora or ())
    try:
        return submit(args.manifest, args.out, address=args.address, render_args=render_args,
                      working_dir=args.working_dir, runtime_env=args.runtime_env_json, follow=args.follow,
                      pip=args.pip or None, token=args.auth_token, submission_id=args.submission_id,
                      secrets=secrets or None)
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`python -m kvray.distributed.submit ...`: the same as `kvray submit ...`."""
    parser = argparse.ArgumentParser(prog="kvray")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)
