"""The diffusion side of training: the U-Nets' noise schedule, noising, targets, dropped conditions.

The schedule is the one the samplers walk (`kvray.sampling.schedulers.SCHEDULE`: cosine, zero terminal
SNR), so a network trained here is sampled exactly as the official ones are.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from ..sampling.schedulers import NUM_TRAIN_TIMESTEPS, SCHEDULE


def alphas_cumprod() -> torch.Tensor:
    return DDPMScheduler(**SCHEDULE).alphas_cumprod.to(torch.float32)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(acp: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise`, one timestep per sample (dim 0)."""
    a = _per_sample(acp[t], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(acp: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The v-prediction target (the interpolation U-Net): `sqrt(acp) noise - sqrt(1 - acp) x0`."""
    a = _per_sample(acp[t], x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def random_timesteps(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, NUM_TRAIN_TIMESTEPS, (count,), generator=generator)


def high_noise_timesteps(count: int, generator: torch.Generator) -> torch.Tensor:
    """Diffusion times with density growing as t^2: three quarters of them above t = 630. At high noise
    the layout of a video (where the shape is in each frame) is decided, and only the prompt and the first
    frame can tell it; a uniform draw spends most of its samples where the noisy frames tell it already."""
    u = torch.rand(count, generator=generator)
    return (NUM_TRAIN_TIMESTEPS * u ** (1 / 3)).long().clamp(max=NUM_TRAIN_TIMESTEPS - 1)


def unconditional_context(context: torch.Tensor, mask: torch.Tensor, null_embedding: torch.Tensor,
                          drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `drop` replaced by the sampler's unconditional context (`TextCondition.unconditional`:
    zeros with the learnt null token first, the row's length kept), the rest unchanged.
    context (B, L, D), mask (B, L) bool, drop (B,) bool."""
    null_context = torch.zeros_like(context)
    null_context[:, 0] = null_embedding.to(context.dtype)
    null_mask = torch.zeros_like(mask)
    null_mask[:, 0] = True
    keep = ~drop
    return (torch.where(keep[:, None, None], context, null_context), torch.where(keep[:, None], mask, null_mask))
