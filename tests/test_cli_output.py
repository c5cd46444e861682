"""What the command line prints where no terminal reads it: plain lines, never a progress bar's carriage returns."""

from __future__ import annotations

import io

from kvray.commands.generate import ProgressBars


def test_progress_in_a_log_is_one_plain_line_per_stage():
    log = io.StringIO()
    bars = ProgressBars(log)
    for stage, total in (("first frame", 3), ("keyframes", 4)):
        for index in range(total):
            bars(stage, index, total)
    bars.close()
    assert log.getvalue() == "first frame: 3 steps done\nkeyframes: 4 steps done\n"
