"""The noise schedule and the solvers that walk it.

The official code builds diffusers' `DDPMScheduler` (`get_sampler`) with a cosine schedule rescaled to
zero terminal SNR (alphas_cumprod[999] = 0), x0 thresholding with ratio 0.995 and the default
`sample_max_value=1.0` (so x0 is simply clipped to [-1, 1]) and the `fixed_small_log` posterior
variance. We take the schedule (betas, alphas_cumprod, timesteps) from the same diffusers class.

The DDPM step itself is written out here rather than called: diffusers draws the posterior noise
inside `step` from a generator it is handed, which cannot replay recorded draws or give each request of
a batch its own stream. `DDPMStepper.step` performs diffusers' arithmetic in diffusers' order (the
golden step cases and a test against `DDPMScheduler.step` check it) and takes its noise from a
`NoiseSource`.

diffusers' scheduler objects are stateful (`set_timesteps`, DPM-Solver's model-output history and
step index, `add_noise` moving `alphas_cumprod` to a device): every loop builds its own stepper, and
the DPM-Solver stepper keeps one scheduler per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from einops import rearrange

from ..config.sampling import SamplerConfig
from .noise import NoiseSource

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

# diffusers is imported where a scheduler is built, not with this module: importing it costs seconds
# that a process which never samples (the decode stage's actors, the CLI's planning) should not pay.

# The training noise schedule of both Kandinsky Video 1.1 U-Nets (official `get_sampler` arguments).
NUM_TRAIN_TIMESTEPS = 1000
SCHEDULE = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    beta_schedule="squaredcos_cap_v2",
    rescale_betas_zero_snr=True,
    thresholding=True,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,  # diffusers' default, not set by the official code
)
# DDPM-only settings; `clip_sample=True` is diffusers' default as the official config records it (it is
# inert: thresholding takes precedence).
DDPM_SETTINGS = dict(variance_type="fixed_small_log", clip_sample=True)


def ddpm_scheduler(config: SamplerConfig) -> DDPMScheduler:
    """A fresh diffusers `DDPMScheduler` as the official `get_sampler` builds it, timesteps set."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        **SCHEDULE, **DDPM_SETTINGS, prediction_type=config.prediction_type, timestep_spacing=config.timestep_spacing
    )
    scheduler.set_timesteps(config.num_steps)
    return scheduler


def dpm_solver_scheduler(config: SamplerConfig) -> DPMSolverMultistepScheduler:
    """A fresh diffusers `DPMSolverMultistepScheduler` on the same schedule, timesteps set. One difference:
    the schedule's last alphas_cumprod (t = 999) is 0 in float32, where DPM-Solver's log-SNR is infinite,
    and diffusers makes it 2**-24 (tested)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        **SCHEDULE,
        prediction_type=config.prediction_type,
        timestep_spacing=config.timestep_spacing,
        algorithm_type="dpmsolver++",  # deterministic: draws no noise after the initial latent
        solver_order=config.solver_order,
    )
    scheduler.set_timesteps(config.num_steps)
    return scheduler


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """diffusers' `_threshold_sample`: per sample (dim 0), s = clamp(quantile(|x0|, ratio), 1, max_value),
    then x0 = clamp(x0, -s, s) / s."""
    dtype = x0.dtype
    batch = x0.shape[0]
    x = x0 if dtype in (torch.float32, torch.float64) else x0.float()
    flat = x.reshape(batch, -1)
    if max_value <= 1.0:
        # s is clamped into [1, max_value] = {1}: the quantile cannot matter (and torch.quantile refuses
        # inputs over 16M elements, which a large batch reaches).
        s = torch.ones(batch, 1, dtype=flat.dtype, device=flat.device)
    else:
        s = torch.cat([torch.quantile(rows.abs(), ratio, dim=1) for rows in flat.split(1024)])
        s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(x0.shape).to(dtype)


def add_noise(samples: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """`sqrt(acp[t]) x + sqrt(1 - acp[t]) noise` with diffusers' `DDPMScheduler.add_noise`.

    The official key-frame augmentation calls it with UNIFORM noise (`torch.rand_like`) at t = 20.
    A scheduler is built per call because `add_noise` moves its tensors to the samples' device.
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**SCHEDULE, **DDPM_SETTINGS)
    return scheduler.add_noise(samples, noise, torch.tensor([int(timestep)]))


class Stepper(Protocol):
    """One solver for one loop: `timesteps`, and `step` from timesteps[index] to the next one."""

    timesteps: list[int]

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        """`model_output`, `sample`: `(R, K, C, h, w)`, R requests of K frames (or groups) each; returns x_prev."""
        ...


class DDPMStepper:
    """The official ancestral DDPM step (diffusers `DDPMScheduler.step`), noise from a `NoiseSource`."""

    def __init__(self, config: SamplerConfig, alphas_cumprod: torch.Tensor | None = None):
        self.config = config
        self.scheduler = ddpm_scheduler(config)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        # The schedule every step reads; replaceable so that a parity check can test the step arithmetic
        # on a recorded schedule, apart from the float32 rounding of the schedule itself.
        self.alphas_cumprod = self.scheduler.alphas_cumprod if alphas_cumprod is None else alphas_cumprod

    def prev_timestep(self, index: int) -> int:
        # diffusers >= 0.28 takes the next scheduled timestep (older versions computed t - 1000 // N for
        # "trailing", which differs when N does not divide 1000).
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else -1

    def step_frames(self, model_output: torch.Tensor, index: int, sample: torch.Tensor, variance_noise=None):
        """One step on `(B, C, h, w)` (each of the B frames is one "sample" for the threshold).

        `variance_noise` (same shape) is needed when timesteps[index] > 0. Returns (x_prev, x0).
        """
        t, prev_t = self.timesteps[index], self.prev_timestep(index)
        acp = self.alphas_cumprod
        # Same operations on the same float32 0-dim tensors as DDPMScheduler.step.
        alpha_prod_t = acp[t]
        alpha_prod_t_prev = acp[prev_t] if prev_t >= 0 else self.scheduler.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        if self.config.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        elif self.config.prediction_type == "v_prediction":
            x0 = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        else:  # sample
            x0 = model_output
        x0 = dynamic_threshold(x0, SCHEDULE["dynamic_thresholding_ratio"], SCHEDULE["sample_max_value"])

        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        prev = x0_coeff * x0 + sample_coeff * sample

        if t > 0:  # diffusers adds (and the official loops draw) noise for every t > 0, even t = 99 -> -1
            if variance_noise is None:
                raise ValueError(f"the step at t={t} needs variance noise")
            # fixed_small_log: std = exp(0.5 log(max(var, 1e-20))), var = (1 - acp_prev)/(1 - acp_t) beta_t
            variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
            std = torch.exp(0.5 * torch.log(variance))
            prev = prev + std * variance_noise.to(model_output.dtype)
        return prev, x0

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        variance_noise = None
        if self.timesteps[index] > 0:
            variance_noise = noise.randn(sample.shape[1:], dtype=torch.float32, device=sample.device)
            variance_noise = rearrange(variance_noise, "r k ... -> (r k) ...")
        prev, _ = self.step_frames(
            rearrange(model_output, "r k ... -> (r k) ..."), index, rearrange(sample, "r k ... -> (r k) ..."), variance_noise
        )
        return rearrange(prev, "(r k) ... -> r k ...", r=sample.shape[0])


class DPMSolverStepper:
    """diffusers' DPM-Solver++ (multistep, deterministic), one scheduler per request.

    A scheduler instance keeps the previous model outputs of its batch; one per request keeps requests
    independent and every thresholding quantile within torch's size limit.
    """

    def __init__(self, config: SamplerConfig):
        self.config = config
        self._schedulers: list[DPMSolverMultistepScheduler] = []
        self.timesteps = [int(t) for t in dpm_solver_scheduler(config).timesteps]

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        while len(self._schedulers) < sample.shape[0]:
            self._schedulers.append(dpm_solver_scheduler(self.config))
        t = self.timesteps[index]
        return torch.stack([
            scheduler.step(out, t, x).prev_sample
            for scheduler, out, x in zip(self._schedulers, model_output, sample)
        ])


def make_stepper(config: SamplerConfig) -> Stepper:
    """A fresh solver for one sampling loop."""
    if config.solver == "ddpm":
        return DDPMStepper(config)
    if config.solver == "dpmsolver++":
        return DPMSolverStepper(config)
    raise ValueError(f"unknown solver {config.solver!r}")
