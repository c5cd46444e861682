"""Scheduler parity with a golden `schedulers.json` + `schedulers.safetensors`.

Two layouts exist: `shared/golden` (one entry per sampler at the top level: `config`, `timesteps`,
`steps`; plus `noise_augmentation`) and `shared/golden-e2e` (`samplers.<name>`: `ddpm_config`,
`timesteps`, `step_triples`; plus `add_noise`). Both record diffusers' `DDPMScheduler.step` called with
`generator=torch.Generator().manual_seed(seed)`; we rebuild each sampler from its recorded settings,
draw the same noise and run our step.

Tolerances: timesteps and configuration exact; step and add_noise outputs 1e-5 (golden-e2e README).
The schedule tables get 1e-6, not the README's 1e-7: diffusers 0.42.1 itself (torch 2.13 CPU) builds
alphas_cumprod 4.2e-7 (a few float32 ulps) away from the recorded one on our machines; the zero-SNR
rescale rounds differently from the machine that recorded it. The last epsilon step (t = 0) divides
by sqrt(1 - alphas_cumprod[0]) ~ 6e-3, which turns those ulps into ~3e-5 of the output. So each step
is checked twice: `<sampler>.step<i>` on the recorded schedule (the step arithmetic, 1e-5) and
`<sampler>.step<i>.own_schedule` on ours (1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checks import CallResult
from ..config.sampling import SamplerConfig
from .schedulers import DDPMStepper, add_noise

TOLERANCES = {
    "config": 0.0, "timesteps": 0.0, "alphas_cumprod": 1e-6, "betas": 1e-6,
    "step": 1e-5, "step_own_schedule": 1e-4, "add_noise": 1e-5,
}


def _diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    return (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0


def _normalise(spec: dict) -> tuple[list[dict], list[dict]]:
    """Both layouts -> samplers [{name, config, timesteps, steps: [{name, timestep, seed}]}] and
    add-noise cases [{name, samples, noise, timestep, out}] (tensor names)."""
    if "samplers" in spec:  # golden-e2e layout
        samplers = [
            {
                "name": name,
                "config": entry["ddpm_config"],
                "timesteps": entry["timesteps"],
                "steps": [
                    {"name": s["name"].removeprefix(f"{name}."), "timestep": s["timestep"], "seed": s["generator_seed"]}
                    for s in entry["step_triples"]
                ],
            }
            for name, entry in spec["samplers"].items()
        ]
        cases = []
        if "add_noise" in spec:
            cases.append({"name": "add_noise", "samples": "add_noise.original_samples", "noise": "add_noise.noise",
                          "timestep": "add_noise.timesteps", "out": "add_noise.out"})
        return samplers, cases
    samplers, cases = [], []
    for name, entry in spec.items():
        if name == "noise_augmentation":
            cases.append({"name": name, "samples": f"{name}.key_frame", "noise": f"{name}.noise",
                          "timestep": int(entry["timestep"]), "out": f"{name}.out"})
        elif isinstance(entry, dict) and {"config", "timesteps", "steps"} <= entry.keys():
            samplers.append({
                "name": name,
                "config": entry["config"],
                "timesteps": entry["timesteps"],
                "steps": [{"name": f"step{s['index']}", "timestep": s["timestep"], "seed": s["generator_seed"]}
                          for s in entry["steps"]],
            })
        else:
            raise ValueError(f"schedulers golden: unknown entry {name!r}")
    return samplers, cases


def _check_step(step: dict, prefix: str, stepper: DDPMStepper, steppers: dict[str, DDPMStepper],
                tensors: dict[str, torch.Tensor]):
    """(check, diff, kind, note) of one recorded step, for each of `steppers`."""
    sample, model_output = tensors[f"{prefix}.sample"], tensors[f"{prefix}.model_output"]
    index = stepper.timesteps.index(step["timestep"])
    # What diffusers draws inside step() (randn_tensor in the model output's dtype), only for t > 0.
    drawn = step["timestep"] > 0
    generator = torch.Generator().manual_seed(int(step["seed"]))
    noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype) if drawn else None
    for kind, each in sorted(steppers.items()):
        prev, x0 = each.step_frames(model_output, index, sample, noise)
        diffs = {"prev_sample": _diff(prev, tensors[f"{prefix}.prev_sample"])}
        if f"{prefix}.pred_original_sample" in tensors:
            diffs["pred_original_sample"] = _diff(x0, tensors[f"{prefix}.pred_original_sample"])
        if f"{prefix}.variance_noise" in tensors:
            diffs["variance_noise"] = _diff(noise if drawn else torch.zeros_like(model_output),
                                            tensors[f"{prefix}.variance_noise"])
        worst = max(diffs, key=diffs.get)
        check = step["name"] if kind == "step" else f"{step['name']}.own_schedule"
        yield check, diffs[worst], kind, f"t={step['timestep']}, worst: {worst}"


def check_scheduler_golden(spec: dict, tensors: dict[str, torch.Tensor]) -> list[CallResult]:
    """Every check of a parsed `schedulers.json` against its tensors (pure; see `check_schedulers_file`)."""
    samplers, cases = _normalise(spec)
    if not samplers:
        raise ValueError("schedulers golden: no samplers found")
    results: list[CallResult] = []

    def add(sampler: str, check: str, diff: float, kind: str, note: str = ""):
        results.append(CallResult("schedulers", f"{sampler}.{check}", diff, TOLERANCES[kind], note))

    for entry in samplers:
        name, recorded = entry["name"], entry["config"]
        config = SamplerConfig(
            prediction_type=recorded["prediction_type"],
            timestep_spacing=recorded["timestep_spacing"],
            num_steps=len(entry["timesteps"]),
        )
        stepper = DDPMStepper(config)
        ours = dict(stepper.scheduler.config)
        mismatched = sorted(k for k, v in recorded.items() if k not in ours or ours[k] != v)
        add(name, "config", float("inf") if mismatched else 0.0, "config",
            f"differs: {', '.join(mismatched)}" if mismatched else "")

        timesteps_ok = stepper.timesteps == list(entry["timesteps"])
        if f"{name}.timesteps" in tensors:
            timesteps_ok &= stepper.timesteps == tensors[f"{name}.timesteps"].tolist()
        add(name, "timesteps", 0.0 if timesteps_ok else float("inf"), "timesteps")
        for table in ("alphas_cumprod", "betas"):
            if f"{name}.{table}" in tensors:
                add(name, table, _diff(getattr(stepper.scheduler, table), tensors[f"{name}.{table}"]), table)

        recorded_schedule = tensors.get(f"{name}.alphas_cumprod")
        steppers = {"step_own_schedule": stepper}
        if recorded_schedule is not None:
            steppers["step"] = DDPMStepper(config, alphas_cumprod=recorded_schedule)
        for step in entry["steps"]:
            for check, diff, kind, note in _check_step(step, f"{name}.{step['name']}", stepper, steppers, tensors):
                add(name, check, diff, kind, note)

    for case in cases:
        timestep = case["timestep"]
        t = int(tensors[timestep].reshape(-1)[0]) if isinstance(timestep, str) else timestep
        out = add_noise(tensors[case["samples"]], tensors[case["noise"]], t)
        add(case["name"], "out", _diff(out, tensors[case["out"]]), "add_noise", f"t={t}")
    return results


def check_schedulers_file(path: str | Path) -> list[CallResult]:
    """`<dir>/schedulers.json` with its `schedulers.safetensors`: one `CallResult` per check."""
    from safetensors.torch import load_file

    path = Path(path)
    spec = json.loads(path.read_text())
    tensors = load_file(path.with_suffix(".safetensors"))
    return check_scheduler_golden(spec, tensors)
