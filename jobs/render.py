"""Ray job entry point: render a manifest on the cluster this job runs on.

    python jobs/render.py MANIFEST --out URI [--preset tiny|kv11] [--weights SRC] [--job job.yaml]
                          [--address ADDR] [--storage-option key=value ...]

The arguments are exactly those of `kvray render`; this file only forwards them to
`kvray.cli.main(["render", ...])` and exits with its code. It is what `kvray submit`, a KubeRay
RayJob (`cluster/kuberay-rayjob.yaml`) or `ray job submit -- python jobs/render.py ...` run as the
job's entrypoint.

Inside a Ray job the driver must join the job's cluster rather than start a Ray of its own, so
`--address auto` is added unless an address is given (`auto` reads RAY_ADDRESS, which the job
supervisor sets to the cluster's GCS address). Run outside a job, this joins a running local Ray
(`ray start --head`); to render without a cluster use `kvray render` instead.

Secrets that `kvray submit` kept out of Ray's job record (sensitive storage options, `--env` values)
arrive in a bundle among the job's py_modules: it is read and deleted before the render starts; the
storage options are added to the arguments here, in this process, and the variables go into the
driver's environment, from where the render hands them to its workers (a worker setup hook).

The job's working directory is the repository (shipped as the runtime_env working_dir, or baked
into the image at /home/ray/kvray): `kvray` is imported from there, so the repository root is put
on sys.path when this file is run by path from elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def with_address(args: list[str], default: str = "auto") -> list[str]:
    """`args` with `--address default` appended unless `--address X` / `--address=X` is already there."""
    if any(a == "--address" or a.startswith("--address=") for a in args):
        return list(args)
    return [*args, "--address", default]


def job_args(argv: list[str]) -> list[str]:
    """`kvray render`'s arguments: `argv` with `--address auto` (see `with_address`) and the storage
    options of the job's secret bundle, whose variables are put in the environment (the bundle is deleted)."""
    from kvray.distributed.secrets import take_bundle

    args = with_address(argv)
    secrets = take_bundle()
    if secrets:
        secrets.apply_env()
        args += secrets.render_args()
    return args


def main(argv: list[str] | None = None) -> int:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    args = job_args(sys.argv[1:] if argv is None else argv)
    from kvray.cli import main as kvray_main

    return kvray_main(["render", *args])


if __name__ == "__main__":
    sys.exit(main())
