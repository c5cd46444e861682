"""Runtime settings: where the networks run and in which precision."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

# "int8": weight-only int8 (torchao, the `kvray[int8]` extra), the text encoder only: each linear
# layer's weight in int8 with a scale per output row, everything else and the activations in bfloat16.
DtypeName = Literal["auto", "float32", "float16", "bfloat16", "int8"]
INT8_NETWORKS = ("text_encoder",)

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

    @model_validator(mode="after")
    def _int8_where_offered(self):
        check_int8({n: getattr(self, f"{n}_dtype") for n in OFFICIAL_GPU_DTYPES})
        return self

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def dtype(self, network: str) -> torch.dtype:
        """torch.int8 stands for weight-only int8 (resolved where the network is built)."""
        name = getattr(self, f"{network}_dtype")
        if name != "auto":
            return getattr(torch, name)
        return OFFICIAL_GPU_DTYPES[network] if self.torch_device().type == "cuda" else torch.float32


def check_int8(dtypes: dict[str, str]) -> None:
    """Weight-only int8 is offered for `INT8_NETWORKS` only."""
    for network, dtype in dtypes.items():
        if dtype == "int8" and network not in INT8_NETWORKS:
            raise ValueError(f"{network}: int8 is offered for {', '.join(INT8_NETWORKS)} only")


def parse_dtype_setting(text: str) -> dict[str, str]:
    """`NETWORK=DTYPE,...` (as `--dtype` takes it) -> {network: dtype name}, checked as RuntimeConfig checks them."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, dtype = item.partition("=")
        if name not in OFFICIAL_GPU_DTYPES or dtype not in DtypeName.__args__:
            raise ValueError(f"{item!r} is not NETWORK=DTYPE with NETWORK one of {', '.join(OFFICIAL_GPU_DTYPES)} "
                             f"and DTYPE one of {', '.join(DtypeName.__args__)}")
        out[name] = dtype
    check_int8(out)
    return out
