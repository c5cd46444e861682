"""Keeps one known false alarm of Ray out of a quiet render's stderr.

Ray Data hands each actor of a pool a reference in its constructor, and Ray's core worker then logs, at
error level, that such an actor could not be restarted if the referenced object were lost
(`core_worker.cc ... has constructor arguments in the object store`, ray-project/ray#57733). For Ray
Data's own pools the object outlives the actors, so the line warns of nothing, yet it reads as an
error on every run. It comes from C++, past Python's logging, so the only place to drop it is the
process's stderr file descriptor: `dropped_from_stderr` routes fd 2 through a pipe for the duration and
forwards everything except lines holding one of `FALSE_ALARMS`.

Install it only after Ray has started its own processes: a child that inherits the pipe would write
into it after the filter is gone.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

FALSE_ALARMS = (b"has constructor arguments in the object store",)
LINE_ENDS = (b"\n", b"\r")


def _write(target: int, data: bytes) -> bool:
    """False once the real stderr is gone (closed, a broken pipe): the pipe is still drained after
    that, or the render would block on its next log line."""
    try:
        os.write(target, data)
    except OSError:
        return False
    return True


def _forward(source: int, target: int, alarms: tuple[bytes, ...]) -> None:
    pending, alive = b"", True
    while chunk := os.read(source, 65536):
        if not alive:
            continue
        pending += chunk
        cut = max(pending.rfind(end) for end in LINE_ENDS) + 1
        lines, pending = pending[:cut], pending[cut:]
        kept = b"".join(line for line in lines.splitlines(keepends=True) if not any(a in line for a in alarms))
        # A partial line that cannot be the start of a Ray log line (they open with "[") goes out now,
        # so that a prompt or a progress bar is never held back.
        if pending and not pending.startswith(b"["):
            kept, pending = kept + pending, b""
        if kept:
            alive = _write(target, kept)
    if pending and alive:
        _write(target, pending)
    os.close(source)


@contextmanager
def dropped_from_stderr(alarms: tuple[bytes, ...] = FALSE_ALARMS):
    """Within the block, lines of fd 2 that hold any of `alarms` are dropped; everything else passes."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(target=_forward, args=(read_end, saved, alarms), daemon=True, name="stderr-filter")
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the forwarder drains it and stops
        forwarder.join(timeout=5.0)
        os.close(saved)
