"""A row's state across runs (`latest_results`): the outcome of the run that made its video, never a
later run's skip of it."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from kvray.io.layout import latest_results


def _run(root, run: str, rows: list[tuple[str, str, str]]) -> None:
    folder = root / "results" / run
    folder.mkdir(parents=True)
    frame = pd.DataFrame(rows, columns=["id", "status", "video_id"])
    frame["uri"] = [f"file:///v/{v}.mp4" if v else "" for v in frame["video_id"]]
    frame["error"] = ["" if v else "no video" for v in frame["video_id"]]
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / "done-00000.parquet")


def test_a_skip_gives_way_to_the_outcome_that_made_the_video(tmp_path):
    _run(tmp_path, "20260101T000000Z-aaaaaa", [("x", "ok", "v1"), ("y", "error", "")])
    _run(tmp_path, "20260102T000000Z-bbbbbb", [("x", "skipped", "v1"), ("y", "ok", "v2"), ("w", "ok", "v3")])
    # z: skipped as a repeat of another prompt (no video of its own); w: its prompt changed, a new video.
    _run(tmp_path, "20260103T000000Z-cccccc", [("x", "skipped", "v1"), ("y", "skipped", "v2"),
                                                ("z", "skipped", ""), ("w", "error", "")])
    state = {r["id"]: (r["status"], r["run"]) for r in latest_results(LocalFileSystem(), str(tmp_path)).to_pylist()}
    assert state == {
        "x": ("ok", "20260101T000000Z-aaaaaa"),
        "y": ("ok", "20260102T000000Z-bbbbbb"),
        "w": ("error", "20260103T000000Z-cccccc"),
        "z": ("skipped", "20260103T000000Z-cccccc"),
    }


def test_kvray_results_prints_each_rows_outcome_and_its_run(tmp_path, capsys):
    from kvray.cli import main

    _run(tmp_path, "20260101T000000Z-aaaaaa", [("x", "ok", "v1")])
    _run(tmp_path, "20260102T000000Z-bbbbbb", [("x", "skipped", "v1")])
    assert main(["results", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["ok 1", "x\tok\tfile:///v/v1.mp4\t20260101T000000Z-aaaaaa"]
