"""Faults a soak injects into a running render (benchmarks only)."""

from __future__ import annotations

import os
import random
import signal

import ray

from ..config.stages import STAGES

LEDGER_PREFIX = "kvray-ledger-"


def running_ledgers() -> list[str]:
    return [a for a in ray.util.list_named_actors() if a.startswith(LEDGER_PREFIX)]


def kill_a_stage_actor(rng: random.Random) -> str | None:
    """SIGKILLs one stage actor of the newest running render, chosen at random; its stage, or None."""
    ledgers = running_ledgers()
    if not ledgers:
        return None
    try:
        actors = ray.get(ray.get_actor(sorted(ledgers)[-1]).report.remote(), timeout=10)["actors"]
    except (ValueError, ray.exceptions.RayError, TimeoutError):  # the run ended meanwhile
        return None
    live = [(stage, a["pid"]) for stage in STAGES for a in actors.get(stage, [])]
    if not live:
        return None
    stage, pid = rng.choice(live)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return stage
