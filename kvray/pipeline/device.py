"""A `RuntimeConfig` made concrete: the torch device, each network's dtype, autocast, threads and the
deterministic settings that make a request's frames depend only on the request and the stack."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import platform

import torch

from ..config.runtime import RuntimeConfig
from ..sampling.loops import LoopOptions


class DeviceError(ValueError):
    """A device that this machine does not have."""


def torch_device(runtime: RuntimeConfig) -> torch.device:
    """The device of `runtime.device`; a CUDA device on a machine without one is a `DeviceError`."""
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(runtime.device)
    except RuntimeError as err:
        raise DeviceError(f"unknown device {runtime.device!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {runtime.device!r} asked for, but torch sees no CUDA device here "
                              "(use --device cpu, or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {runtime.device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise DeviceError(f"device {runtime.device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def network_dtype(runtime: RuntimeConfig, network: str, device: torch.device) -> torch.dtype:
    return getattr(torch, runtime.dtype_name(network, device.type == "cuda"))


def autocast(runtime: RuntimeConfig, device: torch.device, dtype: torch.dtype):
    """The context a U-Net call runs in: `precision: official` autocasts half-precision U-Nets (fp32
    norms and softmax, as the official `torch.cuda.amp.autocast`); otherwise, and for float32, none."""
    if runtime.precision == "official" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def prepare(runtime: RuntimeConfig, device: torch.device) -> None:
    """Process settings a stage makes before it computes: the CPU thread count (if fixed) and, on CUDA,
    kernels chosen by rule rather than by timing (cuDNN autotuning picks by speed, so two runs of the
    same call could take different kernels and round differently)."""
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)
    if device.type == "cuda":
        # Must be set before cuBLAS creates its handle; a value the user chose is kept.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def stack_description(runtime: RuntimeConfig, device: torch.device) -> dict:
    """What a video's bits depend on besides the request and the weights (recorded in its metadata)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        accelerator = {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    else:
        # The vector ISA picks torch's CPU kernels (and so their rounding).
        name = platform.machine()
        accelerator = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    return {
        # A plain str: torch's version string is a class of torch's, and whoever unpickles it (a render's
        # driver reading the ledger) would have to import torch.
        "torch": str(torch.__version__), "device": device.type, "device_name": name, **accelerator,
        "threads": torch.get_num_threads(), "precision": runtime.precision,
        "batch_invariant": runtime.batch_invariant,
    }


class Denoiser:
    """A U-Net as the sampling loops call it, in the runtime's precision: under autocast for
    `precision: official` (float32 inputs, guidance in the U-Net's output dtype, as the official
    code), as built for `fast` (inputs in the U-Net's dtype, guidance in float32)."""

    def __init__(self, unet: torch.nn.Module, runtime: RuntimeConfig, device: torch.device):
        self.unet = unet
        self.null_embedding = unet.null_embedding
        self.runtime, self.device = runtime, device
        tensors = itertools.chain(unet.parameters(), unet.buffers())
        self.dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
        if runtime.precision == "official":
            self.loop_options = LoopOptions(model_dtype=torch.float32, guidance_dtype=None)
        else:
            self.loop_options = LoopOptions(model_dtype=self.dtype, guidance_dtype=torch.float32)

    def options(self, callback=None) -> LoopOptions:
        """The sampling loops' options for this U-Net, with a step callback."""
        return dataclasses.replace(self.loop_options, callback=callback)

    def __call__(self, *args, **kwargs):
        with autocast(self.runtime, self.device, self.dtype):
            return self.unet(*args, **kwargs)
