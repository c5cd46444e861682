"""Which networks a run uses: a preset and where its weights come from."""

from __future__ import annotations

from functools import cache
from importlib import resources

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .presets import ModelPreset, get_preset

RANDOM = "random"
# The preset of the embedded default: the toy model, whose trained weights ship inside the package.
DEFAULT_PRESET = "toy"
TOY_WEIGHTS_PACKAGE = "kvray.toy_weights"
TOY_WEIGHTS_VERSION_FILE = "VERSION"


@cache
def shipped_toy_weights() -> tuple[str, str]:
    """(directory, version) of the toy weights in the package; the version is the digest `kvray train export`
    wrote beside them, so that the video ids of the shipped model do not depend on where it is installed."""
    folder = resources.files(TOY_WEIGHTS_PACKAGE)
    version_file = folder / TOY_WEIGHTS_VERSION_FILE
    if not version_file.is_file():
        raise FileNotFoundError(f"the toy model's weights are missing from {folder} (a broken install?): "
                                "reinstall kvray, or pass --weights")
    return str(folder), version_file.read_text().strip()
# The official Kandinsky Video 1.1 files and the text encoder they were trained with.
DEFAULT_REPO = "ai-forever/KandinskyVideo_1_1"
DEFAULT_T5_REPO = "google/flan-ul2"


class LoraSpec(BaseModel):
    """A LoRA adapter merged into one network's weights when a stage loads it (`kvray train lora` makes
    them). `path`: a local directory, hub repo id or fsspec URL holding the adapter's files. `digest`
    names its tensors in video ids, and `network` is the one it adapts: both filled from the adapter's files
    where the job is checked (`kvray.weights.adapters.resolve_adapters`), and checked again where the
    adapter is merged; a stage whose networks no adapter targets then reads no adapter file.

    Written as a dict, or as the string `PATH[:SCALE]` (the command line's `--lora`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    scale: float = 1.0
    digest: str | None = None
    network: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value):
        if not isinstance(value, str):
            return value
        # A URL's scheme also holds a colon: only a number after the last one is a scale.
        head, _, tail = value.rpartition(":")
        try:
            return {"path": head, "scale": float(tail)} if head else {"path": value}
        except ValueError:
            return {"path": value}

    @property
    def label(self) -> str:
        if self.digest is None:
            raise ValueError(f"adapter {self.path} is not resolved: its digest is read from its files first")
        return f"lora-{self.digest}x{self.scale:g}"


class ModelSource(BaseModel):
    """`weights`: a local directory, a Hugging Face repo id or an fsspec URL; "random" for seeded random
    weights (tests, timing: the compute is the same); None for the preset's default: the official hub
    repo for kv11, the weights shipped in the package for toy, random weights for tiny.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = DEFAULT_PRESET
    weights: str | None = None
    t5: str | None = None  # the T5 encoder of official files (default google/flan-ul2)
    cache_dir: str | None = None
    random_seed: int = 0
    loras: tuple[LoraSpec, ...] = Field(default=(), description="LoRA adapters merged in this order at load")

    @property
    def model_preset(self) -> ModelPreset:
        return get_preset(self.preset)

    @property
    def resolved_weights(self) -> str:
        if self.weights is not None:
            return self.weights
        if self.preset == "toy":
            return shipped_toy_weights()[0]
        return RANDOM if self.preset == "tiny" else DEFAULT_REPO

    @property
    def is_shipped_toy(self) -> bool:
        return self.preset == "toy" and self.weights is None

    @property
    def is_random(self) -> bool:
        return self.resolved_weights == RANDOM

    @property
    def version(self) -> str:
        """Names the weights in output records and in video ids: other weights, other videos."""
        if self.is_shipped_toy:
            weights = f"shipped-{shipped_toy_weights()[1]}"
        else:
            weights = f"random-{self.random_seed}" if self.is_random else self.resolved_weights
        adapters = "".join(f"+{lora.label}" for lora in self.loras)
        return f"kandinsky-video-1.1/{self.preset}/{weights}{adapters}"
