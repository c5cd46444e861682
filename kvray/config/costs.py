"""Cost profiles: each stage's seconds per video on one whole GPU (and optionally its peak memory), as
measured by `kvray bench stages`, estimated by `kvray bench estimate` (a dry run of the full-size
stages, seconds from FLOPs on a named GPU) or given inline. The planner's input; validated at the edge."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from .stages import STAGES
from .validation import validation_message


class CostError(ValueError):
    """A cost profile that cannot be read; the message says what to fix."""


class StageCost(BaseModel):
    """One stage: seconds per video on one whole GPU (after warm-up), at `batch_size` videos per call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seconds: PositiveFloat
    peak_memory_gib: float | None = Field(None, gt=0, description="peak device memory of one actor")
    output_bytes: int | None = Field(None, ge=0, description="bytes a video carries to the next stage")
    batch_size: int | None = Field(None, ge=1, description="videos per call when measured")
    alternatives: dict[str, float] = Field(
        default_factory=dict, description="peak GiB in other precisions, by dtype setting (e.g. 'text_encoder=int8'): "
                                          "what the planner suggests when the stage does not fit a GPU")


class CostProfile(BaseModel):
    """Seconds per video (and optionally peak memory) of each stage on one device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: dict[str, StageCost]
    device: str = "unknown"
    device_memory_gib: float | None = Field(None, gt=0, description="total memory of the measured device")
    meta: dict = Field(default_factory=dict, description="how it was measured: preset, size, fps, command, ...")

    @field_validator("stages")
    @classmethod
    def _four_stages(cls, stages: dict) -> dict:
        missing = [s for s in STAGES if s not in stages]
        unknown = [s for s in stages if s not in STAGES]
        if missing or unknown:
            raise ValueError(f"a cost profile has exactly the stages {', '.join(STAGES)}"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        return {s: stages[s] for s in STAGES}

    def seconds(self, stage: str) -> float:
        return self.stages[stage].seconds

    def memory(self, stage: str) -> float | None:
        return self.stages[stage].peak_memory_gib

    @property
    def total_seconds(self) -> float:
        return sum(c.seconds for c in self.stages.values())

    def bound(self, gpus: float) -> float:
        """Videos/s no plan can beat on `gpus` GPUs: N / sum(w_i)."""
        return gpus / self.total_seconds

    def inline(self) -> str:
        return ",".join(f"{s}={c.seconds:g}" + (f"@{c.peak_memory_gib:g}" if c.peak_memory_gib else "")
                        for s, c in self.stages.items())

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)


_INLINE = re.compile(r"^\s*(\w+)\s*=\s*([0-9.eE+-]+)\s*(?:@\s*([0-9.eE+-]+)\s*)?$")


def parse_costs(source: str | Path | CostProfile) -> CostProfile:
    """A profile file (JSON written by `kvray bench stages`) or an inline list `stage=seconds[@GiB],...`."""
    if isinstance(source, CostProfile):
        return source
    text = str(source).strip()
    path = Path(text)
    if text.endswith(".json") or (path.exists() and path.is_file()):
        try:
            return CostProfile.model_validate_json(path.read_text())
        except OSError as err:
            raise CostError(f"cost profile {text}: {err.strerror or err}") from None
        except ValidationError as err:
            raise CostError(f"cost profile {text}: {validation_message(err, 'profile')}") from None
    stages: dict[str, dict] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        match = _INLINE.match(item)
        if not match:
            raise CostError(f"costs: {item!r} is not stage=seconds or stage=seconds@GiB "
                            f"(e.g. text=0.001,keyframes=0.62,interpolate=0.08,decode=0.30), nor a profile file")
        stage, seconds, memory = match.groups()
        if stage in stages:
            raise CostError(f"costs: {stage} given twice")
        try:
            stages[stage] = {"seconds": float(seconds), **({"peak_memory_gib": float(memory)} if memory else {})}
        except ValueError:
            raise CostError(f"costs: {item!r}: not a number") from None
    try:
        return CostProfile(stages=stages, device="given")
    except ValidationError as err:
        raise CostError(f"costs: {validation_message(err, 'profile')}") from None

