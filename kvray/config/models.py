"""Which networks a run uses: a preset and where its weights come from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from .presets import ModelPreset, get_preset

RANDOM = "random"
# The official Kandinsky Video 1.1 files and the text encoder they were trained with.
DEFAULT_REPO = "ai-forever/KandinskyVideo_1_1"
DEFAULT_T5_REPO = "google/flan-ul2"


class ModelSource(BaseModel):
    """`weights`: a local directory, a Hugging Face repo id or an fsspec URL; "random" for seeded random
    weights (tests, timing: the compute is the same); None for the preset's default: the official hub
    repo, or random weights for the tiny preset, which has no published weights.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = "tiny"
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
        return RANDOM if self.preset == "tiny" else DEFAULT_REPO

    @property
    def is_random(self) -> bool:
        return self.resolved_weights == RANDOM

    @property
    def version(self) -> str:
        """Names the weights in output records and in video ids: other weights, other videos."""
        weights = f"random-{self.random_seed}" if self.is_random else self.resolved_weights
        return f"kandinsky-video-1.1/{self.preset}/{weights}"
