"""`kvray bench pipeline --simulate`: the measurement, the levers, and a small simulated run of the
renderer's stage pools on the session's Ray (8 logical GPUs)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from kvray.bench import pipeline as B
from kvray.bench.simulation import SimulationResult, busy_window, measure, rate_within, steady_rates
from kvray.distributed import planner as P

TEXT_HEAVY = "text=0.5,keyframes=0.125,interpolate=0.01,decode=0.25"


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


def test_steady_rates_are_taken_while_every_actor_of_every_pool_has_work():
    # Pool a: two actors, 1 video per 2 s each; actor 2 starts at 3 s; actor 1 runs dry at 13 s, actor 2 at 15 s.
    a = [(1 + 2 * i, 3 + 2 * i, 1, 1) for i in range(6)] + [(3 + 2 * i, 5 + 2 * i, 2, 1) for i in range(6)]
    assert busy_window(a, actors=2, pools_up=2.0) == (3.0, 13.0)
    assert rate_within(a, 3.0, 13.0) == pytest.approx(1.0)
    # An actor that never worked: the pool was never saturated.
    assert busy_window(a, actors=3, pools_up=0.0) is None
    # Pool b: one fast actor (0.5 s per video): a video early, then one per second, then one late. Its
    # own busy window (2 s to 16.5 s) holds fill and drain; in the common window it runs at a's pace.
    b = [(2, 2.5, 3, 1)] + [(3 + i, 3.5 + i, 3, 1) for i in range(10)] + [(16, 16.5, 3, 1)]
    rates, start, end = steady_rates({"a": a, "b": b}, {"a": 2, "b": 1}, pools_up=2.0)
    assert (start, end) == (3.0, 13.0) and rates["a"] == pytest.approx(1.0) and rates["b"] == pytest.approx(1.0)
    assert rate_within(b, *busy_window(b, 1, 2.0)) < rates["b"]
    # A gap (starvation) inside the window lowers the rate.
    starved = [c if c[2] == 1 or c[0] < 7 else (c[0] + 1, c[1] + 1, 2, 1) for c in a]
    assert steady_rates({"a": starved, "b": b}, {"a": 2, "b": 1}, 2.0)[0]["a"] < 1.0
    assert steady_rates({"a": a, "b": b}, {"a": 3, "b": 1}, 2.0)[0] == {}


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
    # A run that could not be measured says why on its last line, and gives no figure.
    short = replace(result, unmeasured="only 47 of 600 videos finished after the pools were up: too few to measure")
    assert short.lines()[-1].startswith("could not measure: only 47 of 600") and "efficiency=" not in short.lines()[-1]


def test_levers():
    levers = B.Levers()
    assert all(getattr(levers, n) for n in B.LEVERS)
    off = levers.off("prefetch", "planner")
    assert not off.prefetch and not off.planner and off.small_blocks
    with pytest.raises(ValueError, match="unknown lever"):
        levers.off("turbo")


def test_auto_time_scale():
    plan = P.plan(P.parse_costs("text=0.001,keyframes=0.62,interpolate=0.08,decode=0.30"), 16)
    per_video = plan.stages[plan.bottleneck].seconds_per_video
    # A video on a bottleneck actor takes 20 s of wall time ...
    assert B.auto_time_scale(plan, 400, cores=2) * per_video == pytest.approx(20.0, rel=1e-2)
    # ... unless the run would sleep for more than 5 minutes ...
    scale = B.auto_time_scale(plan, 4000, cores=16)
    assert 4000 / plan.videos_per_second * scale == pytest.approx(300.0, rel=1e-2)
    # ... but never more than 2.5 videos per second per core.
    assert B.auto_time_scale(plan, 4000, cores=1) == pytest.approx(plan.bound / 2.5, rel=1e-2)


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
def test_simulated_pipeline_runs_the_renderer(ray_cluster):
    """The renderer itself (planning from a manifest, the planned pools) with stand-in stages on 4 of the
    session's 8 logical GPUs: every video through every pool, every call seen. Efficiency is a figure of
    the benchmark on a quiet machine, not of a test on a shared one. The text stage is the heaviest: its
    pool of two actors, batch 1, must get the rows one block each and share them."""
    result = B.simulated_pipeline(TEXT_HEAVY, 4, 16, time_scale=1.0, max_actors=8)
    assert result.deployment["text"]["actors"] == 2 and result.deployment["text"]["batch_size"] == 1
    assert result.ok == 16
    assert result.spilled_bytes == 0
    assert all(result.actors_started[s] == result.deployment[s]["actors"] for s in P.STAGES)
    calls = result.timeline["calls"]
    assert all(sum(videos for *_, videos in calls[s]) == 16 for s in P.STAGES)
    text_actors = {pid for _, _, pid, _ in calls["text"]}
    assert len(text_actors) == 2 and all(videos == 1 for *_, videos in calls["text"])
    assert result.efficiency > 0 and result.lines()[-1].startswith(("efficiency=", "could not measure: "))
    # The session's Ray is still up for the tests after this one.
    assert ray_cluster.is_initialized()


def test_calls_are_queued_on_actors_only_where_work_waits():
    from kvray.distributed.pools import PoolOptions, queued_calls

    assert queued_calls() == {"text": 2, "keyframes": 1, "interpolate": 1, "decode": 1} == PoolOptions().tasks_per_actor
    plan = P.plan(P.parse_costs("text=0.001,keyframes=0.62,interpolate=0.08,decode=0.30"), 16)
    # Calls of seconds (a simulation's time scale of 8): the keyframes pool is fed by a text pool five
    # times as fast; the interpolation calls (2 s) are short; the decode pool, fed at about its own
    # pace, has calls of 14 s.
    deployment = P.to_deployment(plan, batch_sizes={s: 1 for s in P.STAGES})
    assert queued_calls(plan, deployment, 8.0) == {"text": 2, "keyframes": 2, "interpolate": 2, "decode": 1}
    # In the profile's own seconds every call is short.
    assert set(queued_calls(plan, deployment).values()) == {2}
