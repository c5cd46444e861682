"""Which networks a run uses: a preset and where its weights come from."""

from __future__ import annotations

from functools import cache
from importlib import resources

from pydantic import BaseModel, ConfigDict

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
        return f"kandinsky-video-1.1/{self.preset}/{weights}"
