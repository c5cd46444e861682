"""Named GPUs: memory and dense peak throughput, to turn an estimate's FLOPs into seconds.

Peaks are the vendors' datasheet figures without sparsity, in TFLOP/s, for the three ways a GPU
runs a convolution or a matrix product here:

* "half": fp16 / bf16 on tensor cores (the U-Nets in the official precision, anything in bf16);
* "tf32": fp32 convolutions, which cuDNN runs on tensor cores in TF32 by default in PyTorch
  (`torch.backends.cudnn.allow_tf32`, on unless turned off): the MoVQs in the official precision;
* "fp32": fp32 matrix products and attention, which PyTorch keeps in full fp32 by default
  (`torch.backends.cuda.matmul.allow_tf32` off): the fp32 text encoder.

Seconds = FLOPs / (peak x utilisation). `DEFAULT_UTILISATION` is a stated guess for eager PyTorch
on large convolutions and attention, not a measurement; `kvray bench gpu` measures the achieved
TFLOP/s of each stage on a real GPU, and `--utilisation` takes the measured share.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_UTILISATION = 0.4
DEFAULT_GPU = "h100"
DEFAULT_CONTEXT_GIB = 0.5  # a CUDA context per actor, on top of its peak allocation


class GpuSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    memory_gib: float = Field(gt=0)
    half: float = Field(gt=0, description="dense fp16/bf16 tensor-core TFLOP/s")
    tf32: float = Field(gt=0, description="dense TF32 tensor-core TFLOP/s")
    fp32: float = Field(gt=0, description="fp32 TFLOP/s (no tensor cores)")

    def peak_tflops(self, dtype: str, kind: str) -> float:
        """The peak for an op of input `dtype` ("float16", ...) and `kind` ("conv", "matmul", "attention")."""
        if dtype in ("float16", "bfloat16"):
            return self.half
        if dtype == "float32":
            return self.tf32 if kind == "conv" else self.fp32
        raise ValueError(f"no peak throughput for {dtype} {kind} on {self.name}")

    def seconds(self, flops: dict[tuple[str, str], float], utilisation: float = DEFAULT_UTILISATION) -> float:
        """Seconds for FLOPs keyed by (dtype, kind), at `utilisation` of each peak."""
        return sum(f / (self.peak_tflops(dtype, kind) * 1e12 * utilisation) for (dtype, kind), f in flops.items())


GPUS: dict[str, GpuSpec] = {
    "l4": GpuSpec(name="NVIDIA L4", memory_gib=24, half=121, tf32=60, fp32=30.3),
    "a10": GpuSpec(name="NVIDIA A10", memory_gib=24, half=125, tf32=62.5, fp32=31.2),
    "rtx4090": GpuSpec(name="NVIDIA GeForce RTX 4090", memory_gib=24, half=165.2, tf32=82.6, fp32=82.6),
    "a100-40": GpuSpec(name="NVIDIA A100 40GB", memory_gib=40, half=312, tf32=156, fp32=19.5),
    "l40s": GpuSpec(name="NVIDIA L40S", memory_gib=48, half=362, tf32=183, fp32=91.6),
    "a100": GpuSpec(name="NVIDIA A100 80GB", memory_gib=80, half=312, tf32=156, fp32=19.5),
    "h100": GpuSpec(name="NVIDIA H100 SXM", memory_gib=80, half=989, tf32=495, fp32=67),
    "h100-pcie": GpuSpec(name="NVIDIA H100 PCIe", memory_gib=80, half=756, tf32=378, fp32=51),
    "h200": GpuSpec(name="NVIDIA H200", memory_gib=141, half=989, tf32=495, fp32=67),
}


def get_gpu(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None
