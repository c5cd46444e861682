"""Runtime settings: where the networks run, in which precision, and what a video may depend on.

Torch-free: dtypes are names here, resolved to torch dtypes where the networks are built
(`kvray.pipeline.device`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NETWORKS: tuple[str, ...] = ("text_encoder", "keyframe_unet", "interpolation_unet", "image_movq", "video_movq")
# "int8": weight-only int8 (torchao, the `kvray[int8]` extra), the text encoder only: each linear
# layer's weight in int8 with a scale per output row, everything else and the activations in bfloat16.
DtypeName = Literal["auto", "float32", "float16", "bfloat16", "int8"]
INT8_NETWORKS = ("text_encoder",)
Precision = Literal["official", "fast"]

# The official dtype_map on a GPU: U-Nets in fp16, text encoder and MoVQs in fp32.
OFFICIAL_GPU_DTYPES = {
    "text_encoder": "float32",
    "keyframe_unet": "float16",
    "interpolation_unet": "float16",
    "image_movq": "float32",
    "video_movq": "float32",
}
# `precision: fast` on a GPU: every network in bfloat16 (half the memory, no fp16 overflow without autocast).
FAST_GPU_DTYPE = "bfloat16"


class RuntimeConfig(BaseModel):
    """`device`: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...

    `precision`:
    * "official": each network in the official dtype on a GPU (U-Nets fp16, text encoder and MoVQs fp32;
      float32 on the CPU), the U-Nets called under autocast to their dtype (norms and softmax in fp32,
      the U-Net inputs float32) and the guidance combination done in the U-Net's output dtype, as the
      official code does;
    * "fast": every network in its dtype end to end, no autocast (bfloat16 for every network on a GPU
      unless a dtype is given), guidance and the solver step in float32.
    A `*_dtype` other than "auto" fixes that network's dtype in either mode.

    `batch_invariant` (default on): every network call holds one request (its guidance branches
    together), so a request's frames never depend on which requests share its batch or where it sits
    in it. Off: requests of a batch share U-Net and text-encoder calls, faster where one request does
    not fill the device, but a request's frames then change with its batch.

    `threads`: intra-op CPU threads of the network calls (None: torch's default, the machine's cores).
    On the CPU the frames depend on it: fix it to reproduce a video on another machine.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "auto"
    precision: Precision = "official"
    batch_invariant: bool = True
    threads: int | None = Field(None, ge=1)
    text_encoder_dtype: DtypeName = "auto"
    keyframe_unet_dtype: DtypeName = "auto"
    interpolation_unet_dtype: DtypeName = "auto"
    image_movq_dtype: DtypeName = "auto"
    video_movq_dtype: DtypeName = "auto"

    @model_validator(mode="after")
    def _int8_where_offered(self):
        check_int8({n: getattr(self, f"{n}_dtype") for n in NETWORKS})
        return self

    def dtype_name(self, network: str, on_gpu: bool) -> str:
        """The dtype `network` runs in: its own setting, else the precision's choice for the device."""
        name = getattr(self, f"{network}_dtype")
        if name != "auto":
            return name
        if not on_gpu:
            return "float32"  # CPUs have no fast fp16 kernels
        return OFFICIAL_GPU_DTYPES[network] if self.precision == "official" else FAST_GPU_DTYPE


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
        if name not in NETWORKS or dtype not in DtypeName.__args__:
            raise ValueError(f"{item!r} is not NETWORK=DTYPE with NETWORK one of {', '.join(NETWORKS)} "
                             f"and DTYPE one of {', '.join(DtypeName.__args__)}")
        out[name] = dtype
    check_int8(out)
    return out
