"""`kvray bench pipeline --simulate`: the measurement, the levers, and a small simulated run of the
renderer's stage pools on the session's Ray (8 logical GPUs)."""

from __future__ import annotations

import argparse

import pytest

from kvray.bench import pipeline as B
from kvray.distributed import planner as P
from kvray.distributed.simulate import SimulationResult, measure, planned_rows

SMALL = "text=0.01,keyframes=0.5,interpolate=0.125,decode=0.25"


def test_measure_leaves_out_fill_and_drain():
    # 100 videos at 10/s after a 5 s fill; a slow drain at the end.
    arrivals = [5 + i / 10 for i in range(90)] + [14 + i for i in range(10)]
    rate, start, end = measure(arrivals, pools_up=3.0)
    assert rate == pytest.approx(10.0)
    assert start == pytest.approx(6.0) and end < 14
    # Videos that came out before the pools were all up are not counted.
    rate, start, _ = measure(arrivals, pools_up=8.0)
    assert start >= 8.0 and rate == pytest.approx(10.0)
    assert measure([1.0, 2.0], pools_up=0.0)[0] == 0.0


def test_result_lines_end_with_the_figures():
    result = SimulationResult(gpus=16, videos=400, bound=15.98, steady_videos_per_second=15.5,
                              after_pools_videos_per_second=12.0, pools_up_seconds=40.0, first_video_seconds=42.0,
                              last_video_seconds=140.0, spilled_bytes=0, time_scale=4.0,
                              deployment={s: {"actors": 2, "gpus": 0.5, "cpus": 0.25, "batch_size": 1}
                                          for s in P.STAGES}, ok=400)
    lines = result.lines()
    assert lines[-1] == "efficiency=0.970 throughput=15.5 bound=15.98"
    assert any(line.startswith("object store spilled: 0 bytes") for line in lines)
    assert any("start-up" in line for line in lines) and any("whole run" in line for line in lines)
    # Start-up counts at its wall duration, the rest at the time scale: 40 + 100 / 4 = 65 profiled seconds.
    assert result.total_seconds == pytest.approx(65.0)
    assert result.whole_run_efficiency == pytest.approx(400 / 65 / 15.98)


def test_planned_rows_have_the_renderer_columns():
    from kvray.distributed.workers import RESULT_COLUMNS

    rows = planned_rows(10, prompts=3)
    assert set(RESULT_COLUMNS) | {"request", "gpus", "payload"} == set(rows.columns)
    assert (rows["status"] == "pending").all() and rows["request"].str.contains("simulated prompt 2").sum() == 3


def test_levers():
    levers = B.Levers()
    assert all(getattr(levers, n) for n in B.LEVERS)
    off = levers.off("prefetch", "planner")
    assert not off.prefetch and not off.planner and off.split_blocks
    with pytest.raises(ValueError, match="unknown lever"):
        levers.off("turbo")


def test_auto_time_scale():
    assert B.auto_time_scale(5.0, cores=2) == 1.0
    assert B.auto_time_scale(16.0, cores=2) == pytest.approx(3.2)
    assert B.auto_time_scale(0.65, cores=2) == pytest.approx(0.13)


def test_command_line_options():
    parser = argparse.ArgumentParser()
    B.add_pipeline_parser(parser.add_subparsers())
    args = parser.parse_args(["pipeline", "--simulate", "--gpus", "4", "--lever", "prefetch=off",
                              "--batch-sizes", "keyframes=2", "--time-scale", "2"])
    assert args.simulate and args.gpus == 4 and args.lever == ["prefetch"] and args.batch_sizes == {"keyframes": 2}
    assert args.time_scale == 2.0 and args.costs.startswith("text=0.001,keyframes=0.62")
    for bad in (["--lever", "turbo=off"], ["--batch-sizes", "upscale=2"], ["--time-scale", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["pipeline", "--simulate", *bad])


@pytest.mark.slow
def test_simulated_pipeline_reaches_the_bound(ray_cluster):
    """The proposed stage plan on 4 of the session's 8 logical GPUs keeps the bottleneck busy."""
    result = B.simulated_pipeline(SMALL, 4, 48, time_scale=1.0, max_actors=12)
    assert result.ok == 48
    assert result.spilled_bytes == 0
    assert all(result.actors_started[s] == result.deployment[s]["actors"] for s in P.STAGES)
    assert result.efficiency >= 0.85, result.lines()
    assert result.lines()[-1].startswith("efficiency=")
    # The session's Ray is still up for the tests after this one.
    assert ray_cluster.is_initialized()


