"""Secrets of a render on a cluster, kept out of what Ray records about its jobs.

Ray records a submitted job's entrypoint, runtime_env (env_vars included) and metadata in the
dashboard's job table (``/api/jobs/``) and in its session logs, and a driver that joins a cluster
(``kvray render --address``) is recorded with its command line (``psutil.Process().cmdline()``, that is
``/proc/self/cmdline``). None of these may carry a secret. Instead:

- ``kvray submit`` puts sensitive storage options and every ``--env`` value in a bundle, a 0600 file
  ``kvray_job_secrets/secrets.json`` in a directory of its own that travels as one of the job's
  ``py_modules``: Ray stores its contents in the cluster's internal KV, the job record shows only the
  package's ``gcs://_ray_pkg_<hash>.zip`` name. The job's driver (``jobs/render.py``) reads it with
  :func:`take_bundle`, which deletes the file; the storage options go on to ``kvray render`` inside the
  process, the variables into the driver's environment.
- Workers get those variables from a setup hook (:func:`worker_setup_hook`, given to ``ray.init`` as
  ``runtime_env={"worker_process_setup_hook": hook}``): a function Ray pickles into its internal KV
  and runs in every worker before anything else; it also deletes the node's copy of the bundle.
- A driver joining a cluster calls :func:`redact_command_line` before ``ray.init`` (and users pass
  secrets as ``key=@env:NAME`` / ``key=@file:PATH``, which never put them on a command line at all).

Nothing here imports Ray at module level: the pure parts are tested without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..io.redaction import is_sensitive_key, redact_url, redacted_argv
from ..io.storage_options import is_reference, parse_storage_options

log = logging.getLogger(__name__)

BUNDLE_PACKAGE = "kvray_job_secrets"
BUNDLE_FILE = "secrets.json"
# Names (never values) of the driver's environment variables that its workers get through the setup hook.
WORKER_ENV_NAMES = "KVRAY_WORKER_SECRET_ENV"


@dataclasses.dataclass(frozen=True)
class JobSecrets:
    """What a job must get without Ray recording it: storage options by dotted key (values resolved,
    any JSON type) and environment variables."""

    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.storage_options or self.env)

    def render_args(self) -> list[str]:
        """``--storage-option key=<JSON value>`` for ``kvray render``, in-process only (never a command line)."""
        args: list[str] = []
        for key, value in self.storage_options.items():
            args += ["--storage-option", f"{key}={json.dumps(value)}"]
        return args

    def apply_env(self) -> None:
        """Puts the variables into this process's environment and names them in WORKER_ENV_NAMES, so
        that :func:`worker_setup_hook` hands them on to the workers."""
        os.environ.update(self.env)
        names = {n for n in os.environ.get(WORKER_ENV_NAMES, "").split(",") if n} | set(self.env)
        if names:
            os.environ[WORKER_ENV_NAMES] = ",".join(sorted(names))


def _is_secret_option(item: str) -> bool:
    key, _, raw = item.partition("=")
    return is_sensitive_key(key.strip().rsplit(".", 1)[-1]) or is_reference(raw) or redact_url(raw) != raw


def split_storage_options(items: Iterable[str]) -> tuple[list[str], dict[str, Any]]:
    """``key=value`` items -> (those safe on a command line, the secret ones by dotted key, resolved here).

    Secret: a sensitive key (:func:`~kvray.io.redaction.is_sensitive_key`: key, secret, token, password,
    ...), a ``@env:`` / ``@file:`` reference (read on this machine, where the variable or file is), or a
    URL with credentials in it. Each item is checked as ``kvray render`` would parse it."""
    public, secret = [], {}
    for item in items:
        parsed = parse_storage_options([item])  # ValueError for a bad item, here and not on the cluster
        if not _is_secret_option(item):
            public.append(item)
            continue
        key = item.partition("=")[0].strip()
        value: Any = parsed
        for part in key.split("."):
            value = value[part]
        secret[key] = value
    return public, secret


def write_bundle(directory: str | os.PathLike, secrets: JobSecrets) -> Path:
    """Writes ``secrets`` as ``directory/kvray_job_secrets/secrets.json`` (directory 0700, file 0600) and
    returns the package directory, to be shipped in the job's runtime_env ``py_modules``."""
    package = Path(directory) / BUNDLE_PACKAGE
    package.mkdir(mode=0o700, parents=True)
    path = package / BUNDLE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"storage_options": secrets.storage_options, "env": secrets.env}, fh)
    return package


def _bundle_files(search_path: Iterable[str]) -> list[Path]:
    found = []
    for entry in search_path:
        path = Path(entry or ".") / BUNDLE_PACKAGE / BUNDLE_FILE
        if path.is_file() and path not in found:
            found.append(path)
    return found


def discard_bundles(search_path: Iterable[str] | None = None) -> None:
    """Deletes every copy of a bundle on ``search_path`` (default sys.path): what a worker's setup hook
    does to the copy Ray unpacked on its node."""
    for path in _bundle_files(sys.path if search_path is None else search_path):
        with contextlib.suppress(OSError):
            path.unlink()


def take_bundle(search_path: Iterable[str] | None = None) -> JobSecrets | None:
    """The job's secrets, from the bundle ``kvray submit`` shipped (None when there is none); the file is
    deleted once read. ``search_path``: where Ray put the job's py_modules (default sys.path)."""
    files = _bundle_files(sys.path if search_path is None else search_path)
    if not files:
        return None
    data = json.loads(files[0].read_text())
    for path in files:
        with contextlib.suppress(OSError):
            path.unlink()
    return JobSecrets(storage_options=dict(data.get("storage_options") or {}), env=dict(data.get("env") or {}))


def env_setup_hook(env: dict[str, str]) -> Callable[[], None]:
    """A ``worker_process_setup_hook`` that sets ``env`` in each worker and deletes the node's bundle copy.
    Ray pickles it (values included) into its internal KV; its runtime_env shows only the function's name."""
    values = dict(env)

    def kvray_worker_secrets() -> None:
        os.environ.update(values)
        discard_bundles()

    return kvray_worker_secrets


def worker_setup_hook() -> Callable[[], None] | None:
    """The setup hook for the variables named in WORKER_ENV_NAMES (set by :meth:`JobSecrets.apply_env`),
    with this process's values; None when there are none. The driver passes it to ``ray.init``."""
    names = [n for n in os.environ.get(WORKER_ENV_NAMES, "").split(",") if n]
    if not names:
        return None
    return env_setup_hook({name: os.environ[name] for name in names if name in os.environ})


def redact_command_line(argv: list[str] | None = None) -> bool:
    """Replaces what this process shows as its command line (``ps``, /proc/PID/cmdline, and so what Ray
    records as a driver's entrypoint) by :func:`~kvray.io.redaction.redacted_argv` of it. Call it before
    ``ray.init``. Returns whether anything was secret. ``argv``: the command line (default: this
    process's own, from psutil, as Ray reads it)."""
    if argv is None:
        import psutil

        argv = psutil.Process().cmdline()
    redacted = redacted_argv(argv)
    if redacted == list(argv):
        return False
    title = shlex.join(redacted)
    from ray import (
        _raylet,  # Ray's setproctitle (the setproctitle package is not among kvray's dependencies)
    )

    _raylet.setproctitle(title)
    with contextlib.suppress(ImportError, AttributeError):
        # Ray reads the title back through psutil, which splits a rewritten title at its padding and
        # records `"<title>" "" "" ...`; this records the title alone.
        import ray._private.utils as ray_utils

        ray_utils.get_entrypoint_name = lambda: title
    return True


def remove_bundle_dir(package: Path) -> None:
    """Removes the directory :func:`write_bundle` made (once the job's packages are uploaded)."""
    shutil.rmtree(package.parent, ignore_errors=True)
