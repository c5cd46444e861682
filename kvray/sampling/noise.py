"""Where the sampling loops get their random numbers.

Every draw of a loop goes through a `NoiseSource`, which returns one independent draw per request,
stacked on a new leading axis. With one seeded `torch.Generator` per request (`GeneratorNoise`, the
default) a request gets the same numbers whether it is sampled alone or batched with others, in any
position. `RecordedNoise` replays tensors drawn elsewhere (the official code's global-RNG draws saved in
the golden vectors), which is how the loops are proven equal to the official ones.

Loops ask for each draw with the official per-request shape and in the official order:
first frame: randn(1, 4, H, W), then randn(1, 4, H, W) per step with t > 0;
keyframes: randn(F, 4, h, w), rand(4, h, w) (uniform, key-frame noise augmentation), then
randn(F, 4, h, w) per step with t > 0; interpolation: randn(G, 12, h, w), then one per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch

Shape = Sequence[int]


@runtime_checkable
class NoiseSource(Protocol):
    """Independent random draws for each of `num_requests` requests."""

    @property
    def num_requests(self) -> int: ...

    def randn(self, shape: Shape, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Standard normal, `(num_requests, *shape)`; request i's slice depends only on request i's stream."""
        ...

    def rand(self, shape: Shape, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Uniform on [0, 1), `(num_requests, *shape)`."""
        ...


class GeneratorNoise:
    """One `torch.Generator` per request; each draw is made per request and stacked.

    Generators on the CPU (the default of `from_seeds`) give the same numbers on every machine; the
    tensors are then moved to the requested device (a latent per step: negligible next to a U-Net call).
    """

    def __init__(self, generators: Sequence[torch.Generator]):
        if not generators:
            raise ValueError("GeneratorNoise needs at least one generator")
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], device="cpu") -> GeneratorNoise:
        return cls([torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds])

    @property
    def num_requests(self) -> int:
        return len(self.generators)

    def _draw(self, fn, shape: Shape, dtype, device) -> torch.Tensor:
        draws = [fn(tuple(shape), generator=g, dtype=dtype, device=g.device) for g in self.generators]
        return torch.stack(draws).to(device=device if device is not None else draws[0].device)

    def randn(self, shape: Shape, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        return self._draw(torch.randn, shape, dtype, device)

    def rand(self, shape: Shape, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        return self._draw(torch.rand, shape, dtype, device)


class RecordedNoise:
    """Replays recorded draws of one request, in order.

    Each request for noise must match the next recorded tensor's shape (and, when `kinds` is given,
    its distribution: "randn" or "rand"), so a loop that draws in another order than the recording
    fails loudly instead of silently using the wrong numbers.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], kinds: Sequence[Literal["randn", "rand"]] | None = None):
        if kinds is not None and len(kinds) != len(tensors):
            raise ValueError(f"{len(kinds)} kinds for {len(tensors)} recorded tensors")
        self._tensors = list(tensors)
        self._kinds = list(kinds) if kinds is not None else None
        self._next = 0

    @property
    def num_requests(self) -> int:
        return 1

    @property
    def remaining(self) -> int:
        """Recorded draws not used yet (0 once a loop has consumed exactly what was recorded)."""
        return len(self._tensors) - self._next

    def _take(self, kind: str, shape: Shape, dtype, device) -> torch.Tensor:
        i = self._next
        if i >= len(self._tensors):
            raise RuntimeError(f"recorded noise exhausted: draw {i} ({kind} {tuple(shape)}) was not recorded")
        tensor = self._tensors[i]
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"recorded draw {i} has shape {tuple(tensor.shape)}, the loop asks for {tuple(shape)}")
        if self._kinds is not None and self._kinds[i] != kind:
            raise RuntimeError(f"recorded draw {i} is {self._kinds[i]}, the loop asks for {kind}")
        self._next += 1
        return tensor.to(dtype=dtype, device=device).unsqueeze(0)

    def randn(self, shape: Shape, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        return self._take("randn", shape, dtype, device)

    def rand(self, shape: Shape, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        return self._take("rand", shape, dtype, device)
