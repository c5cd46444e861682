"""Is the dry run's memory right? A run measured on the CPU against the same run under a `DryRun`.

Measured: torch's profiler with `profile_memory=True` receives every allocation and free of torch's
CPU allocator, with its size and time (the allocator reports them itself); their running sum is the
bytes held in tensors at each moment, what `torch.cuda.max_memory_allocated` tracks on a GPU. Two
figures come from it:

* `boundary_peak`: the most held at the moments between the ops the Python code calls (a `Meter`
  marks each in the profile), which is what the dry run's accountant models: every tensor an op
  returns, alive until its last reference goes;
* `peak`: the most held at any moment, also inside kernels: the CPU kernels' own scratch buffers
  (slow_conv3d's unfolded input, attention blocks), which a GPU's kernels replace with their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..sizing.meter import DryRun, Meter

MARK = "kvray.op"


@dataclass(frozen=True)
class Measured:
    peak: int  # bytes, any moment
    boundary_peak: int  # bytes, between ops


class _Marking(Meter):
    """A real run's ops, each followed by a mark in the profile (and counted like a dry run's)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        with torch.profiler.record_function(MARK):
            pass
        return out


def measure_cpu(fn: Callable[[], object]) -> Measured:
    """Runs `fn` for real on the CPU under the profiler; its allocator's peak bytes (from 0 at the start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, _Marking():
        fn()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: (e.start_ns(), e.name() != "[memory]"))
    live = peak = boundary = 0
    for event in events:
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
        elif event.name() == MARK:
            boundary = max(boundary, live)
    return Measured(peak, boundary)


def estimate_cpu(fn: Callable[[], object]) -> int:
    """The peak bytes of `fn` under a dry run."""
    with DryRun() as meter:
        fn()
    return meter.peak
