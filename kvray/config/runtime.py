"""Runtime settings: where the networks run and in which precision."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

DtypeName = Literal["auto", "float32", "float16", "bfloat16"]

# The official dtype_map on a GPU: U-Nets in fp16, text encoder and MoVQs in fp32.
OFFICIAL_GPU_DTYPES = {
    "text_encoder": torch.float32,
    "keyframe_unet": torch.float16,
    "interpolation_unet": torch.float16,
    "image_movq": torch.float32,
    "video_movq": torch.float32,
}


class RuntimeConfig(BaseModel):
    """`device`: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...

    Each network's dtype: "auto" is the official choice on a GPU and float32 on the CPU (CPUs have no
    fast fp16 kernels).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "auto"
    text_encoder_dtype: DtypeName = "auto"
    keyframe_unet_dtype: DtypeName = "auto"
    interpolation_unet_dtype: DtypeName = "auto"
    image_movq_dtype: DtypeName = "auto"
    video_movq_dtype: DtypeName = "auto"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def dtype(self, network: str) -> torch.dtype:
        name = getattr(self, f"{network}_dtype")
        if name != "auto":
            return getattr(torch, name)
        return OFFICIAL_GPU_DTYPES[network] if self.torch_device().type == "cuda" else torch.float32
