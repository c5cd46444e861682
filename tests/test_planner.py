"""The GPU planner: cost profiles, valid fractions, memory limits, placement by Ray's rules, and
optimality against brute force on small cases. Pure Python: no Ray."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from kvray.commands import plan as plan_command
from kvray.distributed import planner as P

EXAMPLE = "text=0.001,keyframes=0.62,interpolate=0.08,decode=0.30"


def profile(*seconds: float, memory: tuple | None = None) -> P.CostProfile:
    memory = memory or (None,) * 4
    return P.CostProfile(stages={s: P.StageCost(seconds=c, peak_memory_gib=m)
                                 for s, c, m in zip(P.STAGES, seconds, memory)})


def random_profiles(n: int, seed: int = 0, spread: float = 500.0):
    rng = random.Random(seed)
    for _ in range(n):
        low = rng.uniform(0.001, 1.0)
        costs = [low * math.exp(rng.uniform(0, math.log(spread))) for _ in P.STAGES]
        costs[rng.randrange(4)] = low
        yield profile(*costs)


# ---------------------------------------------------------------------------------------------------------
# Cost profiles


def test_every_part_of_kvray_names_the_same_stages():
    from kvray.config.job import Deployment
    from kvray.config.runtime import NETWORKS
    from kvray.config.stages import STAGE_NETWORKS, STAGES
    from kvray.distributed.deferred_workers import DEFERRED_WORKERS
    from kvray.distributed.simulate import stand_in_workers
    from kvray.distributed.workers import WORKERS

    stage_fields = tuple(Deployment.model_fields)[:len(STAGES)]  # then how they are pooled (`pools`, `fused`)
    pools = tuple(Deployment(pools="stages").actor_pools())
    stand_ins = stand_in_workers(dict.fromkeys(STAGES, 1))
    assert stage_fields == pools == STAGES == tuple(WORKERS) == tuple(DEFERRED_WORKERS) == tuple(stand_ins)
    assert tuple(P.parse_costs(EXAMPLE).stages) == STAGES == tuple(STAGE_NETWORKS)
    assert sorted(n for networks in STAGE_NETWORKS.values() for n in networks) == sorted(NETWORKS)


def test_parse_inline_costs_with_and_without_memory():
    costs = P.parse_costs(EXAMPLE)
    assert [costs.seconds(s) for s in P.STAGES] == [0.001, 0.62, 0.08, 0.30]
    assert costs.bound(16) == pytest.approx(16 / 1.001)
    with_memory = P.parse_costs("text=0.5@20, keyframes=1@30.5,interpolate=0.1,decode=2e-1@8")
    assert with_memory.memory("keyframes") == 30.5 and with_memory.memory("interpolate") is None
    assert with_memory.seconds("decode") == 0.2
    assert P.parse_costs(with_memory.inline()) == with_memory.model_copy(update={"device": "given"})


def test_parse_a_profile_file(tmp_path):
    path = tmp_path / "costs.json"
    original = P.CostProfile(stages={s: P.StageCost(seconds=0.1 * (i + 1), peak_memory_gib=2.0, output_bytes=10,
                                                    batch_size=2) for i, s in enumerate(P.STAGES)},
                             device="NVIDIA H100", device_memory_gib=79.6, meta={"preset": "kv11"})
    path.write_text(original.to_json())
    assert P.parse_costs(str(path)) == original
    assert P.parse_costs(path) == original


@pytest.mark.parametrize("text, message", [
    ("text=0.001,keyframes=0.62,interpolate=0.08", "missing decode"),
    ("text=0.001,keyframes=0.62,interpolate=0.08,decode=0.3,upscale=1", "unknown upscale"),
    ("text=0.001,keyframes=fast,interpolate=0.08,decode=0.3", "not stage=seconds"),
    ("text=0,keyframes=0.62,interpolate=0.08,decode=0.3", "greater than 0"),
    ("text=0.1,text=0.2,keyframes=0.62,interpolate=0.08,decode=0.3", "given twice"),
    ("missing-profile.json", "missing-profile.json"),
])
def test_bad_costs_say_what_is_wrong(text, message):
    with pytest.raises(P.CostError, match=message):
        P.parse_costs(text)


# ---------------------------------------------------------------------------------------------------------
# Plans are valid


def _check_valid(plan: P.Plan, costs: P.CostProfile, gpu_memory: float | None = None,
                 context: float = P.DEFAULT_CONTEXT_GIB, max_share: int = P.DEFAULT_MAX_SHARE):
    assert set(plan.stages) == set(P.STAGES)
    ks = []
    for s, stage in plan.stages.items():
        assert stage.actors >= 1
        f = stage.gpus_per_actor
        if f >= 1:
            assert f == int(f) and stage.actors_per_gpu == 1
        else:
            k = stage.actors_per_gpu
            assert 2 <= k <= max_share
            assert f == (P.UNIT // k) / P.UNIT  # Ray's 1e-4 fixed point, rounded down
            assert k * round(f * P.UNIT) <= P.UNIT  # k of them fit on one GPU
            ks.append(k)
        expected_speed = (f if f < 1 else 1.0) / costs.seconds(s)
        assert stage.videos_per_second == pytest.approx(stage.actors * expected_speed)
    # One family of sizes, each dividing the next, so that any start order fits.
    for a, b in itertools.combinations(sorted(set(ks)), 2):
        assert b % a == 0, ks
    assert plan.used_gpus <= plan.gpus + 1e-9
    assert plan.videos_per_second <= plan.bound * (1 + 1e-9)
    # The layout Ray would give holds every actor and never more than a GPU.
    assert sorted(s for gpu in plan.layout for s in gpu) == sorted(s for s, x in plan.stages.items() for _ in range(x.actors))
    for gpu in plan.layout:
        assert sum(plan.stages[s].gpus_per_actor for s in gpu) <= 1 + 1e-9 or len(gpu) == 1
        if gpu_memory is not None and all(costs.memory(s) for s in gpu):
            # The memory of every mix of actors on one GPU fits it.
            assert sum(costs.memory(s) + context for s in gpu) <= gpu_memory * max(1, len(gpu) == 1 and
                                                                                    plan.stages[gpu[0]].gpus_per_actor)


@pytest.mark.parametrize("gpus", [1, 2, 4, 7, 16, 32])
def test_plans_are_valid(gpus):
    for costs in itertools.chain([P.parse_costs(EXAMPLE)], random_profiles(40, seed=gpus)):
        plan = P.plan(costs, gpus)
        _check_valid(plan, costs)
        assert plan.efficiency > 0.5


def test_every_start_order_fits():
    """Ray places a fraction on the best-fitting GPU, whole GPUs on free ones; the actors start in any order."""
    rng = random.Random(1)
    for gpus in (3, 8, 16):
        for costs in random_profiles(25, seed=gpus):
            plan = P.plan(costs, gpus, tolerance=0.0)
            items = [(s, round(x.gpus_per_actor * P.UNIT)) for s, x in plan.stages.items() for _ in range(x.actors)]
            for _ in range(20):
                rng.shuffle(items)
                assert P._place(items, gpus) is not None, (plan.lines(), items)


def test_sizes_of_one_family_always_place():
    """The property the planner relies on: sizes 1/k from one family (1, f, 2f, 4f, ...) fit in any order
    whenever their sum fits; mixing families does not."""
    rng = random.Random(2)
    for family in P.FAMILIES:
        sizes = [2 * P.UNIT, P.UNIT] + [P.UNIT // k for k in P._shares(family, 16)[1:]]
        for _ in range(3000):
            gpus = rng.randint(1, 6)
            items, total = [], 0
            while fitting := [x for x in sizes if total + x <= gpus * P.UNIT]:
                size = rng.choice(fitting)
                items.append(("s", size))
                total += size
            rng.shuffle(items)
            assert P._place(items, gpus) is not None, (family, gpus, items)
    third, half = ("a", P.UNIT // 3), ("b", P.UNIT // 2)
    assert P._place([third] * 3 + [half] * 2, 2) is not None  # 3 x 1/3 + 2 x 1/2 fill 2 GPUs in this order...
    assert P._place([third, half, third, half, third], 2) is None  # ...but not in this one


def test_memory_limits_how_many_actors_share_a_gpu():
    costs = P.parse_costs("text=0.001@10,keyframes=0.62@30,interpolate=0.08@7,decode=0.30@17")
    with pytest.raises(ValueError, match="cannot hold"):
        P.plan(costs, 2, gpu_memory_gib=40)  # keyframes fill one GPU; the three others do not fit the second
    for gpus in (3, 4, 8, 16):
        plan = P.plan(costs, gpus, gpu_memory_gib=40, tolerance=0.0)
        _check_valid(plan, costs, gpu_memory=40)
        limits = {s: int(40 // (costs.memory(s) + P.DEFAULT_CONTEXT_GIB)) for s in P.STAGES}
        for s, stage in plan.stages.items():
            assert stage.actors_per_gpu <= limits[s]
        assert plan.stages["keyframes"].gpus_per_actor == 1  # 30 GiB + context: one per 40 GiB GPU
    # Without the memory figures the same costs may share more.
    free = P.plan(P.parse_costs(EXAMPLE), 4, tolerance=0.0)
    assert free.efficiency >= P.plan(costs, 4, gpu_memory_gib=40, tolerance=0.0).efficiency


def test_a_stage_larger_than_a_gpu_is_refused_with_what_would_fit():
    # A stage runs its networks on one device: a second GPU per actor would sit idle while the first overflows.
    costs = P.parse_costs("text=0.001@2,keyframes=0.62@100,interpolate=0.08@7,decode=0.30@17")
    with pytest.raises(P.DoesNotFit, match=r"one keyframes actor needs 100.5 GiB .* 80 GiB GPU .* 101 GiB or more") as err:
        P.plan(costs, 8, gpu_memory_gib=80)
    assert (err.value.stage, err.value.need_gib, err.value.gpu_memory_gib) == ("keyframes", 100.5, 80)
    assert P.plan(costs, 8, gpu_memory_gib=141).stages["keyframes"].gpus_per_actor == 1
    # With the peak in smaller precisions (an estimated profile carries them), the message names them.
    text = P.StageCost(seconds=0.001, peak_memory_gib=32.7, alternatives={"text_encoder=bfloat16": 16.3,
                                                                          "text_encoder=int8": 8.4})
    smaller = costs.model_copy(update={"stages": {**costs.stages, "text": text, "keyframes": P.StageCost(seconds=0.62)}})
    with pytest.raises(P.DoesNotFit, match=r"one text actor .* --dtype text_encoder=bfloat16 \(16.8 GiB\); "
                                           r"--dtype text_encoder=int8 \(8.9 GiB\)"):
        P.plan(smaller, 8, gpu_memory_gib=24)
    with pytest.raises(P.DoesNotFit, match=r"bfloat16 \(16.8 GiB, still too much\)"):
        P.plan(smaller, 8, gpu_memory_gib=16)


def test_the_profile_device_memory_is_the_default():
    costs = P.parse_costs("text=0.001@30,keyframes=0.62@30,interpolate=0.08@30,decode=0.30@30")
    costs = costs.model_copy(update={"device_memory_gib": 40.0})
    plan = P.plan(costs, 4)
    assert all(s.gpus_per_actor == 1 for s in plan.stages.values())
    assert plan.gpu_memory_gib == 40.0


def test_max_actors_is_respected():
    costs = P.parse_costs(EXAMPLE)
    for cap in (4, 8, 20, 40):
        plan = P.plan(costs, 16, max_actors=cap)
        assert plan.actors <= cap
        _check_valid(plan, costs)
    assert P.plan(costs, 16, max_actors=8).efficiency < P.plan(costs, 16, max_actors=40).efficiency
    with pytest.raises(ValueError, match="at most 3 actors"):
        P.plan(costs, 16, max_actors=3)


# ---------------------------------------------------------------------------------------------------------
# Optimality


def _every_plan(costs: P.CostProfile, gpus: int, max_share: int, max_actors: int | None = None) -> list[tuple]:
    """Every plan the planner may choose from (one family of sizes per plan, any number of actors), each as
    (its stages' rates, its actors): enumerated once, scored for any slack by `_best`."""
    plans = []
    for family in P.FAMILIES:
        per_stage = []
        for s in P.STAGES:
            options = []
            for k in P._shares(family, max_share):
                size = P.UNIT // k
                for actors in range(1, gpus * P.UNIT // size + 1):
                    options.append((actors, size, actors * size / P.UNIT / costs.seconds(s)))
            per_stage.append(options)
        for combo in itertools.product(*per_stage):
            if sum(a * size for a, size, _ in combo) > gpus * P.UNIT:
                continue
            actors = sum(a for a, _, _ in combo)
            if max_actors is None or actors <= max_actors:
                plans.append((tuple(r for _, _, r in combo), actors))
    return plans


def _best(plans: list[tuple], slack: float = 0.0) -> tuple[float, list[tuple[float, int]]]:
    """The best throughput as the planner counts it (`slack_rate`), and every plan's (throughput, actors)."""
    scored = [(P.slack_rate(list(rates), slack), actors) for rates, actors in plans]
    return max(rate for rate, _ in scored), scored


def _credited(plan: P.Plan, slack: float) -> float:
    return P.slack_rate([s.videos_per_second for s in plan.stages.values()], slack)


@pytest.mark.parametrize("gpus, max_share", [(1, 4), (2, 4), (3, 2), (2, 8)])
def test_optimal_on_small_cases(gpus, max_share):
    for costs in random_profiles(6, seed=10 * gpus + max_share, spread=50):
        every = _every_plan(costs, gpus, max_share)
        for slack in (0.0, P.DEFAULT_SLACK):
            best, plans = _best(every, slack)
            plan = P.plan(costs, gpus, max_share=max_share, tolerance=0.0, slack=slack)
            assert _credited(plan, slack) == pytest.approx(best, rel=1e-9), plan.lines()
            # No plan as fast has fewer actors.
            assert plan.actors == min(a for r, a in plans if r >= best * (1 - 1e-9))
            # With a tolerance: the fewest actors within it.
            relaxed = P.plan(costs, gpus, max_share=max_share, tolerance=0.1, slack=slack)
            assert _credited(relaxed, slack) >= best * 0.9 * (1 - 1e-9)
            assert relaxed.actors == min(a for r, a in plans if r >= best * 0.9 * (1 - 1e-9))


def test_optimal_with_an_actor_limit():
    for costs in random_profiles(8, seed=5, spread=50):
        best, _ = _best(_every_plan(costs, 2, 4, max_actors=5))
        plan = P.plan(costs, 2, max_share=4, tolerance=0.0, slack=0.0, max_actors=5)
        assert plan.videos_per_second == pytest.approx(best, rel=1e-9)


def test_the_planner_beats_equal_pools():
    costs = P.parse_costs(EXAMPLE)
    for gpus in (4, 16, 32):
        planned, equal = P.plan(costs, gpus), P.equal_plan(costs, gpus)
        assert planned.videos_per_second > 2 * equal.videos_per_second
        assert equal.efficiency == pytest.approx(4 * 0.62 and (gpus // 4) / 0.62 / costs.bound(gpus))


def test_close_to_the_bound_on_many_gpus():
    """With up to 500x between stage costs, the plan's prediction comes within a few percent of N/sum(w)."""
    for costs in random_profiles(60, seed=7):
        assert P.plan(costs, 16).efficiency >= 0.955
        assert P.plan(costs, 32).efficiency >= 0.955
    assert P.plan(P.parse_costs(EXAMPLE), 16).efficiency >= 0.97


# ---------------------------------------------------------------------------------------------------------
# Deployments


def test_to_deployment_and_batch_sizes():
    from kvray.config.job import Deployment, StageDeployment

    costs = P.parse_costs(EXAMPLE)
    plan = P.plan(costs, 16)
    sizes = P.suggest_batch_sizes(plan, costs, videos=400)
    assert sizes["text"] >= 8 and all(1 <= b <= 16 for b in sizes.values())
    for s, b in sizes.items():
        # Few enough calls per second, unless the run is too short to give every actor 8 calls of that size.
        granular = max(1, 400 // (8 * plan.stages[s].actors))
        assert b <= granular
        assert plan.videos_per_second / b <= P.DEFAULT_CALLS_PER_SECOND or b == granular
    base = Deployment(decode=StageDeployment(cpus=2.0, batch_size=3))
    deployment = P.to_deployment(plan, batch_sizes={"keyframes": 2}, base=base)
    for s, stage in plan.stages.items():
        assert deployment.stage(s).actors == stage.actors and deployment.stage(s).gpus == stage.gpus_per_actor
    assert deployment.keyframes.batch_size == 2 and deployment.decode.batch_size == 3 and deployment.decode.cpus == 2.0
    # A measured batch size wins: the cost and memory were measured at it.
    measured = costs.model_copy(update={"stages": {**costs.stages, "keyframes": P.StageCost(seconds=0.62, batch_size=4)}})
    assert P.suggest_batch_sizes(plan, measured)["keyframes"] == 4


def test_the_job_keeps_pools_it_fixes():
    from kvray.config.job import Deployment, RenderJob

    fixed = RenderJob(manifest="m", out="o", costs=EXAMPLE, deployment={"keyframes": {"actors": 3}})
    assert P.deployment_fixes_pools(fixed.deployment)
    assert P.plan_job(fixed, gpus=16) == (P.text_rows_one_at_a_time(fixed), None)  # pools kept, text on CPUs
    only_batches = RenderJob(manifest="m", out="o", costs=EXAMPLE, deployment={"text": {"batch_size": 32}})
    assert not P.deployment_fixes_pools(only_batches.deployment) and not P.deployment_fixes_pools(Deployment())
    planned, chosen = P.plan_job(only_batches, gpus=16)
    assert chosen == P.plan(EXAMPLE, 16, P.DEFAULT_GPU_MEMORY_GIB)
    assert planned.deployment.text.batch_size == 32
    assert planned.deployment.keyframes.actors == chosen.stages["keyframes"].actors
    assert planned.deployment.keyframes.gpus == chosen.stages["keyframes"].gpus_per_actor
    assert P.plan_job(only_batches, gpus=0) == (only_batches, None)  # no GPUs: nothing to plan


def test_a_job_of_few_rows_starts_at_most_one_actor_per_row():
    from kvray.config.job import RenderJob

    job = RenderJob(manifest="m", out="o", costs=EXAMPLE)
    unbounded = P.plan_job(job, gpus=16)[1]
    assert sum(s.actors for s in unbounded.stages.values()) > 6
    for rows in (1, 2, 6):
        planned, chosen = P.plan_job(job, gpus=16, rows=rows)
        assert sum(s.actors for s in chosen.stages.values()) == max(4, rows)  # one per stage at least
        assert all(planned.deployment.stage(s).actors == c.actors for s, c in chosen.stages.items())
    assert P.plan_job(job, gpus=16, rows=10_000)[1] == unbounded


def test_a_text_stage_on_cpus_takes_one_row_per_call_unless_the_job_says():
    from kvray.config.job import RenderJob

    default = RenderJob(manifest="m", out="o")
    assert default.deployment.text.batch_size > 1
    assert P.plan_job(default, gpus=0)[0].deployment.text.batch_size == 1
    chosen = RenderJob(manifest="m", out="o", deployment={"text": {"batch_size": 8}})
    assert P.plan_job(chosen, gpus=0)[0] == chosen
    on_gpus = RenderJob(manifest="m", out="o", costs=EXAMPLE)
    planned, plan = P.plan_job(on_gpus, gpus=16)
    assert plan.stages["text"].gpus_per_actor and planned.deployment.text.batch_size == on_gpus.deployment.text.batch_size


def test_a_small_job_on_cpus_gets_one_fused_pool_unless_it_sets_its_stages():
    from kvray.config.job import FUSED, RenderJob

    default = RenderJob(manifest="m", out="o")
    fused = P.resolve_pools(default, rows=6, cores=2).deployment
    assert fused.pools == FUSED and fused.fused.actors == 2 and list(fused.actor_pools()) == [FUSED]
    assert P.resolve_pools(default, rows=1, cores=8).deployment.fused.actors == 1  # never more actors than rows
    assert P.resolve_pools(default, rows=50, cores=8).deployment.fused.actors == 8
    # One pool per stage: a job that sets any stage (its batch too), a GPU device, a preset with a cost profile.
    for job in (RenderJob(manifest="m", out="o", deployment={"keyframes": {"batch_size": 2}}),
                RenderJob(manifest="m", out="o", runtime={"device": "cuda"}),
                RenderJob(manifest="m", out="o", models={"preset": "kv11"}),
                RenderJob(manifest="m", out="o", costs=EXAMPLE)):
        resolved = P.resolve_pools(job, rows=6, cores=2).deployment
        assert resolved.pools == "stages" and list(resolved.actor_pools()) == list(P.STAGES), job
    # What the job names, it keeps.
    named = RenderJob(manifest="m", out="o", deployment={"pools": "fused", "fused": {"actors": 3, "cpus": 1}})
    assert P.resolve_pools(named, rows=1, cores=1) == named
    staged = RenderJob(manifest="m", out="o", deployment={"pools": "stages"})
    assert P.resolve_pools(staged, rows=6, cores=2) == staged


def test_the_job_plans_with_the_estimated_profile_for_kv11_only():
    from kvray.config.job import RenderJob
    from kvray.sizing.estimate import job_profile

    kv11 = RenderJob(manifest="m", out="o", models={"preset": "kv11"}, gpu="a100")
    profile = job_profile(kv11)
    assert profile.meta["estimate"] and profile.meta["request"]["fps"] == "low" and profile.device_memory_gib == 80
    assert P.plan_job(kv11, gpus=8)[1] == P.plan(profile, 8, 80)
    tiny = RenderJob(manifest="m", out="o", models={"preset": "tiny"})
    planned, chosen = P.plan_job(tiny, gpus=8)
    assert chosen is None and planned.deployment.text.batch_size == 1  # no profile: pools kept, text on CPUs
    assert planned.deployment.model_copy(update={"text": tiny.deployment.text}) == tiny.deployment
    # A 24 GiB GPU cannot hold the fp32 text encoder: the render is refused before any actor starts.
    with pytest.raises(P.DoesNotFit, match="one text actor"):
        P.plan_job(kv11.model_copy(update={"gpu_memory_gib": 24.0}), gpus=8)


def test_a_job_with_unreadable_costs_is_refused(tmp_path):
    from pydantic import ValidationError

    from kvray.config.job import RenderJob

    with pytest.raises(ValidationError, match="missing decode"):
        RenderJob(manifest="m", out="o", costs="text=1,keyframes=1,interpolate=1")
    with pytest.raises(ValidationError, match="cost profile"):
        RenderJob(manifest="m", out="o", costs=str(tmp_path / "absent.json"))
    profile = tmp_path / "costs.json"
    profile.write_text(P.parse_costs(EXAMPLE).to_json())
    assert RenderJob(manifest="m", out="o", costs=str(profile)).costs == str(profile)


def test_plan_summary_is_json():
    summary = P.plan_summary(P.plan(EXAMPLE, 8))
    assert json.loads(json.dumps(summary)) == summary
    assert summary["gpus"] == 8 and set(summary["stages"]) == set(P.STAGES)


def test_plan_command(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    plan_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", "--gpus", "16", "--costs", EXAMPLE, "--equal"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "bound 15.98 videos/s" in out and "equal plan" in out and "deployment:" in out
    args = parser.parse_args(["plan", "--gpus", "16", "--costs", "text=1"])
    assert args.run(args) == 2
    assert "missing keyframes" in capsys.readouterr().err
