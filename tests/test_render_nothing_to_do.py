"""A render with nothing to render (every row done, refused or a repeat) ends before Ray starts, and is
recorded as any run is: its rows in its results, its record in runs/."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from kvray.config.job import RenderJob
from kvray.distributed.render import render
from kvray.io.layout import latest_results
from kvray.io.opening import open_fs


def test_nothing_to_render_needs_no_ray(tmp_path, monkeypatch):
    manifest = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({
        "id": ["empty", "wide", "twice", "twice"],
        "prompt": ["  ", "a red circle", "a blue square", "a green circle"],
        "width": [64, 100, 64, 64],
    }), manifest)

    def no_ray(*args, **kwargs):
        raise AssertionError("a run with nothing to render must not start Ray")

    monkeypatch.setattr("kvray.distributed.render.connect", no_ray)
    summary = render(RenderJob(manifest=str(manifest), out=str(tmp_path / "out")))
    assert (summary.status, summary.rows, summary.ok, summary.error, summary.skipped) == ("finished", 4, 0, 4, 0)
    assert summary.exit_code == 1 and len(summary.first_errors) == 4
    assert "not reached" not in "\n".join(summary.lines())  # every row accounted for
    fs, root = open_fs(str(tmp_path / "out"))
    state = {r["id"]: r["status"] for r in latest_results(fs, root).to_pylist()}
    assert state == {"empty": "error", "wide": "error", "twice": "error"}
    record = json.loads((tmp_path / "out" / "runs" / f"{summary.run_id}.json").read_text())
    assert record["status"] == "finished" and record["summary"]["error"] == 4
    assert not (tmp_path / "out" / ".lease.json").exists()
