"""`kvray bench stages` on the tiny preset: a cost profile the planner reads back."""

from __future__ import annotations

from kvray.cli import main
from kvray.distributed import planner as P


def test_bench_stages_writes_a_profile_the_planner_reads(tmp_path, capsys):
    out = tmp_path / "costs.json"
    code = main(["bench", "stages", "--preset", "tiny", "--device", "cpu", "--width", "64", "--height", "64",
                 "--fps", "medium", "--steps", "2", "--interpolation-steps", "1", "--warmup", "0", "--repeats", "1",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "keyframes" in printed and f"wrote {out}" in printed
    profile = P.parse_costs(str(out))
    assert list(profile.stages) == list(P.STAGES)
    assert all(cost.seconds > 0 and cost.batch_size == 1 for cost in profile.stages.values())
    # What a video carries between stages in the renderer: text context, + 12 keyframe latents, the video latents.
    sizes = {s: c.output_bytes for s, c in profile.stages.items()}
    assert 0 < sizes["text"] < sizes["keyframes"] and sizes["interpolate"] > 0 and sizes["decode"] == 0
    assert profile.meta["width"] == 64 and profile.meta["fps"] == "medium" and profile.meta["frames"] == 45
    assert profile.device.startswith("cpu") and profile.device_memory_gib is None
    plan = P.plan(profile, 4)
    assert plan.videos_per_second > 0


def test_bench_stages_refuses_a_bad_dtype(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["bench", "stages", "--dtype", "keyframe_unet=int8"])
    assert "--dtype" in capsys.readouterr().err
