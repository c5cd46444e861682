"""`kvray train lora`: a LoRA adapter on the keyframe U-Net that teaches the toy model a concept its world
lacks (a `CONCEPT_SHAPES` shape), the base weights frozen.

The loss is the keyframes step's, on batches half of the concept and half of the world the base model
knows (what it knew is rehearsed, so the adapter does not overwrite it), with an image-mode batch every
other step: a new shape is drawn in the first frame, which the keyframes then carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..weights.lora import add_lora, lora_config, lora_tensors, save_adapter
from .recipe import LORA
from .steps import Context, KeyframesStep

NETWORK = "keyframe_unet"


@dataclass(frozen=True)
class AdapterPlan:
    rank: int
    convs: bool
    out: str  # where the adapter (its EMA weights) is written at each checkpoint


class LoraStep(KeyframesStep):
    name = LORA
    image_mode_every = 2

    def __init__(self, ctx: Context, plan: AdapterPlan):
        # The text step's set-up, not the keyframes step's: the U-Net comes from the base, adapted, not trained whole.
        super(KeyframesStep, self).__init__(ctx, ctx.load("text_encoder").requires_grad_(False))
        self.plan = plan
        unet = ctx.load(NETWORK)
        self.lora = lora_config(unet, plan.rank, convs=plan.convs)
        add_lora(unet, self.lora).train()
        self.networks = {NETWORK: unet}
        self.movq = ctx.load("image_movq")
        self.frames = 12

    def null_embedding(self, network: str) -> torch.Tensor:
        """The base model's: the unconditional branch is not the adapter's to change."""
        return self.networks[network].null_embedding

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{NETWORK}/{k}": v for k, v in lora_tensors(self.networks[NETWORK]).items()}

    def export(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        state = {k.split("/", 1)[1]: v for k, v in tensors.items()}
        base_parameters = sum(p.numel() for name, p in self.networks[NETWORK].named_parameters() if "lora_" not in name)
        return save_adapter(self.plan.out, state, self.lora, NETWORK, self.ctx.preset.name,
                            concept=self.ctx.data.concept, base_parameters=base_parameters)
