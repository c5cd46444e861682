"""The CPU priority of the worker processes of a Ray that kvray starts (torch- and Ray-free)."""

from __future__ import annotations

from collections.abc import MutableMapping

WORKER_NICENESS = "RAY_worker_niceness"


def keep_workers_at_normal_priority(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Ray starts its workers at niceness 15 so that its daemons stay responsive, but kvray's stage
    actors are the work: at 15, any other busy process on the machine takes nearly all the CPU from
    them (a render ran about 10 times slower on 2 cores beside two busy loops). A Ray that kvray starts
    (the embedded local Ray, `LocalCluster`) runs them at 0, unless `env` already names a niceness.
    Raylets read it at start, so `env` is the environment of the process that starts Ray."""
    env.setdefault(WORKER_NICENESS, "0")
    return env
