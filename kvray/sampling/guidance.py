"""Classifier-free guidance combinations (written in the official operation order, so that float32
results match the official loops bit for bit)."""

from __future__ import annotations

import torch


def guide_2way(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """`(w + 1) cond - w uncond`: the first frame (w = key_frame_guidance_scale, 5 by default, i.e. an
    effective scale of 6) and interpolation (w = interpolation_guidance_scale, 0.5)."""
    return (scale + 1.0) * cond - scale * uncond


def guide_3way(
    full: torch.Tensor, image_only: torch.Tensor, uncond: torch.Tensor, prompt_weight: float, image_weight: float
) -> torch.Tensor:
    """Keyframes, InstructPix2Pix style, from three branches: A = text + first frame (`full`),
    B = first frame only (`image_only`), C = neither (`uncond`):

        eps_C + w_I (eps_B - eps_C) + w_T (eps_A - eps_B)
        = (1 - w_I) eps_C + (w_I - w_T) eps_B + w_T eps_A   (the official form, computed here)

    with w_T = guidance_weight_prompt (5) and w_I = guidance_weight_image (2).
    """
    return (1 - image_weight) * uncond + (image_weight - prompt_weight) * image_only + prompt_weight * full
