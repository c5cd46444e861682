"""Run code at any size without the memory or the accelerator, and measure it: `DryRun`.

Under a `DryRun`, torch's fake tensors stand in for the device's tensors (`FakeTensorMode`: a tensor
has its shape, dtype and device, no storage is allocated and no kernel runs; shape and dtype errors
are raised as in a real run). Every op passes through `Meter`, which

* routes: an op whose inputs are all real tensors (or none) runs for real: host data such as
  tokens, camera paths, schedules and noise draws, whose values the code reads (`int(...)`). An op
  that touches a fake tensor is simulated, and so is everything computed from it. Networks built
  under a dry run (`kvray.weights.random_network`) are fake: a 35 GB text encoder costs nothing.
* counts memory: the bytes of every live tensor storage on the simulated device (weights,
  activations, inputs and outputs, real or fake), freed when the last tensor using the storage
  dies, as the allocator frees it; `peak` is their high-water mark. Not counted, as they are not
  tensors a Python op returns: workspaces inside kernels (cuDNN, cuBLAS) and the allocator's
  rounding; `kvray bench gpu` measures what they add on a GPU.
* counts the simulated ops' FLOPs with torch's own formulas (`torch.utils.flop_counter`, the table `FlopCounterMode`
  uses: convolutions, matrix products, attention; 2 FLOPs per multiply-add), keyed by the dtype of
  the op's input and its kind (conv, matmul, attention), which is what sets its speed on a GPU.
  Composite ops are decomposed first, as `FlopCounterMode` does, so that `linear` under
  `inference_mode` counts as its matrix product. One formula `FlopCounterMode` lacks is added: the
  CPU flash-attention kernel, which the dry run's CPU device dispatches to.

`instrument(module, meter, name)`: a network called again with the same arguments (every tensor's
shape, strides and dtype, every other argument's value) is not traced again; the call is credited
with the first call's FLOPs and memory high-water mark, and returns fresh fake tensors of the same
shapes. A 50-step sampling loop then traces one U-Net call per distinct shape and still counts 50.

The simulated device is the CPU: torch's CUDA dispatch is not built into a CPU-only torch, so fake
CUDA tensors fail at the first device guard. The CPU's kernel choices match the GPU's where memory is
concerned (fused attention that never holds the attention matrix); the dtypes are the caller's
choice (`RuntimeConfig`), not the CPU's defaults.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

SIMULATED_DEVICE = torch.device("cpu")
# FlopCounterMode's table has the CUDA flash-attention kernel; the CPU one has the same arithmetic.
_FORMULAS = {**flop_registry,
             aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention]}
_ATTENTION = {name for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                                "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                                "_flash_attention_forward", "_efficient_attention_forward")}
_CONV = {"convolution", "_convolution", "convolution_overrideable", "cudnn_convolution", "_slow_conv2d_forward"}
# (dtype name, kind) -> FLOPs
FlopCounts = Counter


def flop_kind(op_name: str) -> str:
    """"conv", "attention" or "matmul": what a GPU runs the op on decides its speed."""
    if op_name in _CONV:
        return "conv"
    return "attention" if op_name in _ATTENTION else "matmul"


@functools.cache
def _decomposes(func) -> bool:
    """A composite op without a FLOP formula of its own, seen as the ops it is made of."""
    return (func._overloadpacket not in _FORMULAS and func is not torch.ops.prim.device.default
            and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"))


class Meter(TorchDispatchMode):
    """Routes every op (real or simulated), counts live storage bytes on the simulated device and FLOPs."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.flops: FlopCounts = Counter()
        self.calls: dict[tuple[str, str, tuple[int, ...]], Calls] = {}
        self._storages: dict[int, tuple[weakref.ref, int]] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def adopt(self, tensors) -> None:
        """Counts tensors made before the meter (a stage's inputs) as live on the device."""
        for tensor in tensors:
            self._track(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if _decomposes(func):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        simulated = any(is_fake(t) or t.is_meta for t in inputs)
        if simulated:
            out = func(*args, **kwargs)
        else:
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        formula = _FORMULAS.get(packet)
        # Only simulated ops are the device's work (they involve the fake weights); an op on real tensors
        # alone is host arithmetic on data, such as an animation's camera path in float64.
        if formula is not None and simulated:
            flops = formula(*args, **kwargs, out_val=out)
            self.flops[(str(inputs[0].dtype).removeprefix("torch."), flop_kind(packet.__name__))] += flops
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        self.peak = max(self.peak, self.live)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        # A wrapper subclass (a quantized weight) owns no storage: its inner tensors are counted.
        if tensor.device != SIMULATED_DEVICE or is_traceable_wrapper_subclass(tensor):
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._storages:
            return
        size = storage.nbytes()
        self._storages[key] = (weakref.ref(storage, functools.partial(self._free, key)), size)
        self.live += size

    def _free(self, key: int, _ref=None) -> None:
        _, size = self._storages.pop(key)
        self.live -= size


class DryRun:
    """`with DryRun() as meter:` fake tensors and a `Meter` (see the module notes)."""

    def __init__(self):
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.meter = Meter()

    def __enter__(self) -> Meter:
        self.fake.__enter__()
        self.meter.__enter__()
        return self.meter

    def __exit__(self, *exc):
        self.meter.__exit__(*exc)
        self.fake.__exit__(*exc)


ENTRY_POINTS = ("forward", "encode", "decode")  # what the stages call on their networks


@dataclass
class Calls:
    """Calls of one network entry point with one input shape: how many, and their FLOPs in all."""

    count: int = 0
    flops: int = 0


def instrument(module: nn.Module, meter: Meter, name: str, *, replay: bool = True,
               entry_points=ENTRY_POINTS) -> None:
    """Records the module's calls in `meter.calls` by (name, entry point, first input's shape); with `replay`,
    a call with the same arguments as an earlier one is credited with that call's FLOPs and memory
    high-water mark instead of being traced again."""
    for entry in entry_points:
        method = getattr(module, entry, None)
        if callable(method):
            setattr(module, entry, _instrumented(method, meter, name, entry, replay))


def _instrumented(method: Callable, meter: Meter, name: str, entry: str, replay: bool) -> Callable:
    traced: dict[tuple, tuple[int, FlopCounts, object]] = {}

    @functools.wraps(method)
    def call(*args, **kwargs):
        key = _signature(args, kwargs) if replay else None
        if key in traced:
            excursion, flops, templates = traced[key]
            meter.peak = max(meter.peak, meter.live + excursion)
            meter.flops.update(flops)
            out = tree_map(_fresh, templates)
        else:
            live, peak, before = meter.live, meter.peak, Counter(meter.flops)
            meter.peak = live
            out = method(*args, **kwargs)
            excursion = meter.peak - live
            meter.peak = max(peak, meter.peak)
            flops = Counter(meter.flops)
            flops.subtract(before)
            flops = +flops
            if key is not None:
                traced[key] = (excursion, flops, tree_map(_template, out))
        first = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)), None)
        record = meter.calls.setdefault((name, entry, tuple(first.shape) if first is not None else ()), Calls())
        record.count += 1
        record.flops += sum(flops.values())
        return out

    return call


def _signature(args, kwargs) -> tuple | None:
    """What the cost of a call depends on: the arguments' structure, each tensor's layout, each other
    value. None (never replayed) if an argument has no meaningful value to compare."""
    leaves, spec = tree_flatten((args, kwargs))
    key = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        elif leaf is None or isinstance(leaf, (bool, int, float, str, torch.dtype)):
            key.append(leaf)
        else:
            return None
    return tuple(key)


class _Template:
    """A tensor a call returned, kept to replay the call: its layout on the meta device (no memory)."""

    def __init__(self, tensor: torch.Tensor):
        self.meta = torch.empty_like(tensor, device="meta")
        self.device = tensor.device


def _template(value):
    return _Template(value) if isinstance(value, torch.Tensor) else value


def _fresh(value):
    return torch.empty_like(value.meta, device=value.device) if isinstance(value, _Template) else value
