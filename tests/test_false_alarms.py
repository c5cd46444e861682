"""Ray's known false alarm is dropped from a quiet render's stderr, and nothing else is."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, sys
from kvray.distributed.false_alarms import dropped_from_stderr
with dropped_from_stderr():
    os.write(2, b"before\n[2026-12-06 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker' has ")
    os.write(2, b"constructor arguments in the object store and max_restarts > 0.\n")
    os.write(2, b"1/6 rows\r2/6 rows\r")
    print("from python", file=sys.stderr)
    os.write(2, b"[2026-12-06 E 1 1] raylet.cc:10: a real error\n")
os.write(2, b"after\n")
"""


def test_only_the_false_alarm_is_dropped():
    err = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, check=True, timeout=60).stderr
    assert err == b"before\n1/6 rows\r2/6 rows\rfrom python\n[2026-12-06 E 1 1] raylet.cc:10: a real error\nafter\n"


def test_a_closed_stderr_never_blocks_the_render():
    """Whoever reads stderr may go away (`kvray render ... 2>&1 | head`): the pipe is still drained."""
    script = ("import os\nfrom kvray.distributed.false_alarms import dropped_from_stderr\n"
              "with dropped_from_stderr():\n    for _ in range(64):\n        os.write(2, b'x' * 4095 + b'\\n')\n")
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    process.stderr.close()
    assert process.wait(timeout=60) == 0
