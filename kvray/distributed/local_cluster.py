"""A Ray cluster of several nodes on this machine, for tests and soaks: a head and more nodes, each
`ray start`ed with its own temp dir and free ports and no token auth; only its own processes are stopped
(by PID, never `ray stop`, which would end every Ray of the machine). Drives Ray through its command
line: nothing here imports Ray."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .priority import keep_workers_at_normal_priority


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class LocalCluster:
    url: str  # the dashboard
    address: str  # the GCS, for a driver joining the cluster
    temp_dir: Path  # every file the cluster writes (session logs, unpacked runtime envs)
    env: dict  # an environment for processes talking to this cluster

    def add_node(self, cpus: int, gpus: int = 0) -> int:
        """Starts another node (its own raylet) and returns its raylet's PID. It gets a temp dir of its own
        (below the cluster's), as a real node has its own disk: nodes sharing one would unpack a job's
        working dir over each other."""
        before = set(self.raylets())
        own = self.temp_dir / f"n{len(before)}"
        own.mkdir()
        _ray_start([f"--address={self.address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}", f"--temp-dir={own}",
                    "--object-store-memory=100000000", "--disable-usage-stats"], self.env, self.temp_dir)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            added = set(self.raylets()) - before
            if added:
                return added.pop()
            time.sleep(0.2)
        raise RuntimeError("the new node's raylet did not start")

    def raylets(self) -> list[int]:
        return [p.pid for p in processes(str(self.temp_dir)) if "raylet" in p.name()]

    def stop(self) -> None:
        stop_processes(str(self.temp_dir))

    def actors(self, title: str) -> list[psutil.Process]:
        """The processes of the actors on this cluster whose process title starts with `title`."""
        return [p for p in processes(str(self.temp_dir)) if _title(p).startswith(title)]

    def stage_actors(self) -> list[psutil.Process]:
        """The processes of the stage actors of the renders running on this cluster."""
        return self.actors("ray::MapWorker(MapBatches(")


def _ray_start(arguments: list[str], env: dict, cwd: Path) -> None:
    command = [str(Path(sys.executable).parent / "ray"), "start", *arguments]
    started = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if started.returncode:
        raise RuntimeError(f"ray start failed: {started.stderr[-2000:]}")


# Ray's GCS declares a node dead after 5 failed health checks 3 s apart (and a 10 s timeout each): 15 s
# and more in which a lost node's actors are neither alive nor restarted. A test that kills a node waits
# for that, so its cluster checks every second and gives up after 3 (still far above the answer time of
# a raylet on a machine whose cores are busy: it runs at normal priority, see `priority`).
QUICK_NODE_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "3000",
    "RAY_health_check_failure_threshold": "3",
}


def start_head(cpus: int, gpus: int = 0, env: dict[str, str] | None = None) -> LocalCluster:
    """`env`: more environment for the cluster's processes (Ray's settings, e.g. QUICK_NODE_FAILURE_DETECTION)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="kvray-head-", dir="/tmp"))  # short: Ray's socket paths have a limit
    dashboard, gcs = free_port(), free_port()
    env = keep_workers_at_normal_priority({**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                                           **(env or {})})
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    _ray_start(["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={temp_dir}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                "--object-store-memory=100000000", "--disable-usage-stats"], env, temp_dir)
    return LocalCluster(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", temp_dir, env)


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def processes(marker: str) -> list[psutil.Process]:
    """Every process whose command line names `marker`, and their descendants."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in process.info["cmdline"] or ()):
            found[process.pid] = process
            with contextlib.suppress(psutil.Error):
                found.update({child.pid: child for child in process.children(recursive=True)})
    return list(found.values())


def stop_processes(marker: str) -> None:
    running = processes(marker)
    for process in running:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(running, timeout=6)  # gcs_server can sit on SIGTERM
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
