"""Submit a render to a running Ray cluster as a Ray job: `kvray submit`.

    kvray submit MANIFEST --out URI --address http://HEAD:8265 [--working-dir DIR] [--no-follow]
                 [--runtime-env-json JSON] [--preset tiny|kv11] [--weights SRC] [--job job.yaml]
                 [--storage-option key=value ...]

The job runs `python jobs/render.py MANIFEST --out URI ...` on the cluster (`jobs/render.py` forwards
to `kvray render` and joins the cluster with `--address auto`). The code travels as the job's
runtime_env `working_dir`: by default the repository this package sits in (jobs/, kvray/, examples/,
cluster/), without .venv, .git, caches and output folders; the cluster's image must already hold the
dependencies (torch, ray[default,data], ...): see cluster/README.md. A relative manifest, job file or
image path in the manifest is relative to that working directory on the cluster.

`address` is the dashboard's HTTP address (http://HEAD:8265; port-forward it for a remote or
Kubernetes cluster). Ray 2.60 token authentication: a head started with RAY_AUTH_MODE=token rejects
requests without its token (HTTP 401/403). The token is looked up as Ray does (the `token`
argument / --auth-token, else RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token) and sent as `Authorization: Bearer <token>`; Ray's own client sends it only when
RAY_AUTH_MODE=token is set in the client's environment, so it is passed explicitly here. A head
started with RAY_AUTH_MODE=disabled ignores the header.

Secrets stay out of Ray's records (the job table at /api/jobs/, session logs) and off stderr:
storage options with a sensitive key (key, secret, token, password, ...), `@env:` / `@file:` values and
URLs with credentials, and every `--env` value, travel in a 0600 bundle shipped as one of the job's
`py_modules` (see kvray/distributed/secrets.py); the rest of the options stay on the entrypoint.

The parts that need no cluster (`build_entrypoint`, `build_runtime_env`, `auth_headers`,
`render_args_from`, `secrets_from_args`) are pure functions, tested without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TextIO

from ..io.redaction import redacted_argv
from .secrets import JobSecrets, remove_bundle_dir, split_storage_options, write_bundle

# The repository holding this package: kvray/distributed/submit.py -> kvray/ -> root.
REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY_SCRIPT = "jobs/render.py"

# gitignore-style patterns, relative to the working_dir, never shipped with a job.
# Virtual environments without the trailing slash: a symlink to one is excluded too.
DEFAULT_EXCLUDES = (
    ".venv*", "venv", ".git/", "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", ".ruff_cache/",
    "out/", "outputs/", "renders/", "build/", "dist/", "*.mp4", "*.safetensors", "*.pt",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """Something a user can fix (unreachable address, bad token, missing working dir): one clear line."""


# --------------------------------------------------------------------------------------------------
# Pure parts: no Ray, no network.


def build_entrypoint(manifest: str, out: str, render_args: list[str] | tuple[str, ...] = (), *,
                     script: str = ENTRY_SCRIPT, python: str = "python") -> str:
    """The job's shell command: `python jobs/render.py MANIFEST --out OUT RENDER_ARGS...`, each part quoted."""
    parts = [python, script, manifest, "--out", out, *render_args]
    return shlex.join(str(p) for p in parts)


def render_args_from(*, preset: str | None = None, weights: str | None = None, job: str | None = None,
                     costs: str | None = None, gpu_memory: float | None = None,
                     storage_options: list[str] | tuple[str, ...] = (), loras: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The `kvray render` options a submit passes through, in a fixed order; None is left out."""
    args: list[str] = []
    for flag, value in (("--preset", preset), ("--weights", weights), ("--job", job), ("--costs", costs),
                        ("--gpu-memory", gpu_memory)):
        if value is not None:
            args += [flag, str(value)]
    for lora in loras:
        args += ["--lora", lora]
    for option in storage_options:
        args += ["--storage-option", option]
    return args


def secrets_from_args(storage_options: list[str] | tuple[str, ...] = (),
                      env: list[str] | tuple[str, ...] = ()) -> tuple[list[str], JobSecrets]:
    """(the storage options safe on the entrypoint, the job's secrets): secret storage options (see
    `split_storage_options`, references resolved here) and every `KEY=VALUE` of `env`."""
    public, secret_options = split_storage_options(storage_options)
    return public, JobSecrets(storage_options=secret_options, env=dict(kv.split("=", 1) for kv in env))


def _is_uri(path: str) -> bool:
    return "://" in path


def check_out(out: str) -> None:
    """A job's --out must mean the same on the cluster as here: a URI, or an absolute path (one the
    cluster's nodes share). A relative path would land in the job's temporary working directory on the
    cluster, and vanish with it."""
    if not _is_uri(out) and not Path(out).is_absolute():
        raise SubmitError(f"--out {out} is a relative path: on the cluster it would land in the job's temporary "
                          "working directory and vanish with it; give a URI (s3://bucket/prefix, gs://...) or an "
                          "absolute path that every node shares")


def build_runtime_env(working_dir: str | None = None, runtime_env: dict | None = None, *,
                      pip: list[str] | None = None, env_vars: dict[str, str] | None = None,
                      extra_excludes: list[str] | tuple[str, ...] = ()) -> dict:
    """The job's runtime_env.

    `working_dir`: None ships the repository root (it must hold jobs/render.py); a local directory
    ships that directory; a URI (s3://.../kvray.zip, https://.../archive.zip) is passed to Ray as is;
    "" ships nothing (the image holds the code). Local directories get `excludes` (DEFAULT_EXCLUDES
    plus `extra_excludes`). `pip` and `env_vars` only appear when given; `runtime_env` (a user's dict,
    e.g. from --runtime-env-json) is applied last and wins, except that its `excludes` and `env_vars`
    are added to ours; its `working_dir` counts as the `working_dir` argument when that is None.
    """
    env: dict = {}
    user = dict(runtime_env or {})
    if working_dir is None and "working_dir" in user:
        working_dir = user.pop("working_dir") or ""
    if working_dir is None:
        working_dir = str(REPO_ROOT)
        if not (REPO_ROOT / ENTRY_SCRIPT).is_file():
            raise SubmitError(
                f"{REPO_ROOT / ENTRY_SCRIPT} not found: kvray is not running from its repository "
                "(installed as a package?); pass --working-dir with a kvray checkout, a working_dir URI, "
                "or '' when the cluster's image holds the code"
            )
    if working_dir:
        if _is_uri(working_dir):
            env["working_dir"] = working_dir
        else:
            path = Path(working_dir).expanduser().resolve()
            if not path.is_dir():
                raise SubmitError(f"working dir {working_dir} is not a directory")
            env["working_dir"] = str(path)
            env["excludes"] = [*DEFAULT_EXCLUDES, *extra_excludes]
    if pip:
        env["pip"] = list(pip)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    if "excludes" in user and "excludes" in env:
        user["excludes"] = [*env["excludes"], *user["excludes"]]
    if "env_vars" in user and "env_vars" in env:
        user["env_vars"] = {**env["env_vars"], **user["env_vars"]}
    env.update(user)
    if not env.get("working_dir"):
        env.pop("working_dir", None)
        env.pop("excludes", None)
    return env


def _output_exclude(out: str, working_dir: str | None) -> list[str]:
    """A local --out inside the shipped directory is not shipped with the next job."""
    if _is_uri(out) or working_dir == "" or (working_dir and _is_uri(working_dir)):
        return []
    root = Path(working_dir).expanduser().resolve() if working_dir else REPO_ROOT
    try:
        rel = Path(out).expanduser().resolve().relative_to(root)
    except ValueError:
        return []
    return [f"/{rel.as_posix()}/"] if rel.parts else []


def find_token(token: str | None = None) -> tuple[str | None, str]:
    """The cluster's auth token and where it came from, looked up in Ray's order; (None, "") when none."""
    if token:
        return token.strip(), "--auth-token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            text = Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {err}") from err
        if not text:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return text, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        text = default.read_text().strip()
        if text:
            return text, str(default)
    return None, ""


def auth_headers(token: str | None = None) -> dict[str, str]:
    """`{"Authorization": "Bearer <token>"}` when a token is found (see find_token), else {}."""
    found, _ = find_token(token)
    return {"Authorization": f"Bearer {found}"} if found else {}


def normalize_address(address: str | None) -> str | None:
    """The dashboard URL: `HEAD:8265` gets `http://`; trailing slashes go. `auto` / `ray://` pass through.

    None stays None: Ray then reads RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (a GCS address it turns
    into the dashboard's), else looks for a local Ray.
    """
    if address is None:
        return None
    address = address.strip().rstrip("/")
    if address == "auto" or "://" in address:
        return address
    return f"http://{address}"


# --------------------------------------------------------------------------------------------------
# The cluster parts.


@contextlib.contextmanager
def _without_env(*names: str):
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _client(address: str, headers: dict[str, str], token_source: str = ""):
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as err:  # pragma: no cover - ray is a dependency
        raise SubmitError(f"Ray's job client is missing ({err}); install ray[default]") from err
    from ray.exceptions import AuthenticationError

    try:
        # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; here the explicit one wins.
        explicit = address not in (None, "auto")
        with _without_env(*(("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if explicit else ())):
            return JobSubmissionClient(address, headers=headers or None)
    except AuthenticationError as err:
        sent = f"the token from {token_source} was refused" if token_source else "no token was sent"
        hint = (f"the head uses token authentication and {sent}: pass its token with --auth-token or "
                "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
        raise SubmitError(f"{address}: {err.message.splitlines()[0]}; {hint}") from err
    except ConnectionError as err:
        raise SubmitError(
            f"cannot reach the Ray dashboard at {address} ({err}); is the head running with the dashboard "
            "(ray[default]) and is port 8265 reachable (ray dashboard CLUSTER.yaml / kubectl port-forward)?"
        ) from err
    except (ValueError, RuntimeError) as err:
        raise SubmitError(f"cannot use Ray address {address}: {err}") from err


async def _tail(client, job_id: str, stream: TextIO, shown: list[int]) -> None:
    async for lines in client.tail_job_logs(job_id):
        stream.write(lines)
        stream.flush()
        shown[0] += len(lines)


def follow_logs(client, job_id: str, stream: TextIO, poll_s: float = 1.0) -> str:
    """Streams the job's logs until it ends; returns its final status name.

    The log tail is a websocket; if it drops (proxies, an older head), logs are polled instead.
    """
    streamed = [0]
    try:
        asyncio.run(_tail(client, job_id, stream, streamed))
    except Exception as err:  # noqa: BLE001 - fall back to polling whatever went wrong with the socket
        print(f"(log stream interrupted: {err}; polling)", file=sys.stderr)
        shown = streamed[0]
        while True:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            stream.write(logs[shown:])
            stream.flush()
            shown = len(logs)
            if _status_name(status) in TERMINAL:
                break
            time.sleep(poll_s)
    return wait_for_status(client, job_id, poll_s=poll_s)


def _shown(command: str) -> str:
    """The entrypoint as printed: credentials a hand-written one may hold are masked (see redacted_argv)."""
    try:
        return shlex.join(redacted_argv(shlex.split(command)))
    except ValueError:  # not a shell command line (unbalanced quotes): mask what can be found in it
        return " ".join(redacted_argv(command.split()))


def _status_name(status) -> str:
    """JobStatus is a str enum; fakes in tests may hand back plain strings."""
    return str(getattr(status, "value", status))


def wait_for_status(client, job_id: str, poll_s: float = 0.5, timeout_s: float = 60.0) -> str:
    """The job's terminal status (the log stream may close a moment before the status is final)."""
    deadline = time.monotonic() + timeout_s
    while True:
        name = _status_name(client.get_job_status(job_id))
        if name in TERMINAL or time.monotonic() > deadline:
            return name
        time.sleep(poll_s)


def _submission_hint(err: Exception) -> str:
    if "413" in str(err):
        return (" (the working dir is packed whole and Ray refuses uploads over 100 MiB: keep data and "
                "environments out of it, or add excludes with --runtime-env-json '{\"excludes\": [...]}')")
    return ""


def submit(manifest: str, out: str, *, address: str | None, render_args: list[str] | tuple[str, ...] = (),
           working_dir: str | None = None, runtime_env: dict | None = None, follow: bool = True,
           pip: list[str] | None = None, env_vars: dict[str, str] | None = None, token: str | None = None,
           submission_id: str | None = None, metadata: dict[str, str] | None = None,
           entrypoint: str | None = None, entrypoint_num_cpus: float | None = None,
           secrets: JobSecrets | None = None,
           stream: TextIO | None = None, client_factory: Callable | None = None) -> int:
    """Submits `python jobs/render.py MANIFEST --out OUT RENDER_ARGS` as a Ray job at `address`.

    Prints the job id. With `follow`, streams the job's logs until it ends and returns 0 if it
    SUCCEEDED, else 1; without, returns 0 once the job is accepted. Raises SubmitError with one
    readable line for an unreachable address, a missing token or a bad working dir.

    `working_dir`, `runtime_env`, `pip`, `env_vars`: see `build_runtime_env` (`env_vars` are recorded by
    Ray in the clear: secrets go in `secrets`, shipped as a bundle the job's driver reads and deletes,
    see kvray/distributed/secrets.py). `token`: the head's
    auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token). `entrypoint`
    replaces the render command (tests, debugging). `stream`: where the logs go (default stdout).
    `client_factory(address, headers)` replaces Ray's JobSubmissionClient (tests).
    """
    stream = stream or sys.stdout
    check_out(out)
    address = normalize_address(address)
    env = build_runtime_env(working_dir, runtime_env, pip=pip, env_vars=env_vars,
                            extra_excludes=_output_exclude(out, working_dir))
    command = entrypoint or build_entrypoint(manifest, out, render_args)
    found, source = find_token(token)
    headers = {"Authorization": f"Bearer {found}"} if found else {}
    client = client_factory(address, headers) if client_factory else _client(address, headers, source)
    meta = {"kvray_manifest": manifest, "kvray_out": out, **(metadata or {})}
    kwargs = dict(entrypoint=command, runtime_env=env, metadata=meta, submission_id=submission_id)
    if entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
    address = getattr(client, "_address", None) or address  # as Ray resolved it (None: from the environment)
    bundle = write_bundle(tempfile.mkdtemp(prefix="kvray-secrets-"), secrets) if secrets else None
    if bundle is not None:
        env["py_modules"] = [*env.get("py_modules", []), str(bundle)]
    try:
        job_id = client.submit_job(**kwargs)
    except Exception as err:  # noqa: BLE001 - HTTP, auth and packaging errors all end the command the same way
        raise SubmitError(f"job submission to {address} failed: {err}{_submission_hint(err)}") from err
    finally:
        if bundle is not None:
            remove_bundle_dir(bundle)  # uploaded with the job's packages, or not sent at all
    print(f"submitted job {job_id} to {address}: {_shown(command)}", file=sys.stderr, flush=True)
    print(job_id, flush=True)
    if not follow:
        print(f"follow it with: ray job logs --follow {job_id} --address {address}", file=sys.stderr)
        return 0
    try:
        status = follow_logs(client, job_id, stream)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: ray job stop {job_id} --address {address}",
              file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}", file=sys.stderr, flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    # `python -m kvray.distributed.submit` (cluster/local.sh) is `kvray submit`, whose parser lives with the CLI.
    from ..commands.submit import main

    sys.exit(main())
