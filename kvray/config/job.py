"""A render job: which manifest, where the outputs go, which models, and how each stage is deployed.

Loaded from YAML (`--job job.yaml`) and overridden by command-line flags; validated before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .costs import CostError, parse_costs
from .dataset import DatasetConfig
from .gpus import get_gpu
from .images import ImagePolicy, manifest_location
from .models import ModelSource
from .runtime import RuntimeConfig
from .sampling import NOISE_AUGMENTATION, Fps, GuidanceConfig, Motion
from .stages import STAGES


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StageDeployment(_Strict):
    """One actor pool: `actors` actors, each holding `gpus` GPUs (a fraction shares a GPU with other
    light actors) and `cpus` CPUs, fed batches of `batch_size` rows."""

    actors: int = Field(1, ge=1)
    gpus: float = Field(0.0, ge=0)
    cpus: float = Field(0.25, ge=0)
    batch_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _whole_gpus_above_one(self):
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"more than one GPU per actor must be a whole number, got {self.gpus}")
        return self


FUSED = "fused"


class Deployment(_Strict):
    """The actor pools of a render: one per stage (`pools: stages`, sized per stage), or one `fused` pool whose
    actors each run all four stages (`pools: fused`). Fused suits CPUs: a row's payload never leaves its
    process, and a run starts one process per actor instead of one per stage and actor; on GPUs each stage
    wants its own. `auto` (the default) fuses a job that runs on CPUs, fixes no stage's pool and has a small
    preset, with one actor per core (kvray.distributed.planner.resolve_pools)."""

    text: StageDeployment = StageDeployment(batch_size=8)
    keyframes: StageDeployment = StageDeployment()
    interpolate: StageDeployment = StageDeployment()
    decode: StageDeployment = StageDeployment()
    pools: Literal["auto", "stages", "fused"] = "auto"
    fused: StageDeployment = StageDeployment()

    def stage(self, name: str) -> StageDeployment:
        return getattr(self, name)

    def actor_pools(self) -> dict[str, StageDeployment]:
        """The pools a render starts, by name: the stages, or `fused` alone. An `auto` deployment is resolved
        before a render starts its pools; until then it counts as one pool per stage."""
        if self.pools == FUSED:
            return {FUSED: self.fused}
        return {name: self.stage(name) for name in STAGES}


class RequestDefaults(_Strict):
    """Values for manifest columns that are missing or null. None: the preset's or the official default."""

    width: int | None = None
    height: int | None = None
    fps: Fps = "low"
    motion: Motion = "medium"
    guidance: GuidanceConfig = GuidanceConfig()
    noise_augmentation: int = Field(NOISE_AUGMENTATION, ge=0, le=999)
    steps: int | None = Field(None, ge=1, le=1000)
    interpolation_steps: int | None = Field(None, ge=1, le=1000)


class RayOptions(_Strict):
    """`address`: None starts a local Ray (the embedded default); "auto" or HOST:PORT joins a running cluster."""

    address: str | None = None
    # For a local Ray only: logical resources, so stage actors can be placed on a laptop.
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_memory: int | None = None


class RenderJob(_Strict):
    manifest: str
    out: str
    models: ModelSource = ModelSource()
    runtime: RuntimeConfig = RuntimeConfig()
    defaults: RequestDefaults = RequestDefaults()
    deployment: Deployment = Deployment()
    ray: RayOptions = RayOptions()
    storage_options: dict = Field(default_factory=dict, description="fsspec options for the manifest and outputs")
    results_per_file: int = Field(10_000, ge=1, description="rows per results/*.parquet file")
    video_format: Literal["mp4", "gif", "webp"] = "mp4"
    dataset: DatasetConfig = Field(DatasetConfig(), description="output layout (files or webdataset shards), "
                                   "quality filters")
    images: ImagePolicy = Field(ImagePolicy(), description="where rows' images may come from, and their limits "
                                "(default: under the manifest's own location, or public http(s))")
    # The planner sizes the pools when `deployment` fixes no stage's actors or gpus and the cluster has GPUs.
    costs: str | None = Field(None, description="cost profile for the planner: a JSON file of `kvray bench stages` "
                              "or `kvray bench estimate`, or stage=seconds[@GiB],...; default for kv11: estimated "
                              "for the job's default request on `gpu`; none (the deployment as given) for other presets")
    gpu: str | None = Field(None, description="named GPU of the estimated profile (kvray.config.gpus): its speeds "
                            "and memory (default h100)")
    gpu_memory_gib: float | None = Field(None, gt=0, description="memory of one GPU for the planner "
                                         "(default: the profile's device, else 80)")
    stall_timeout_s: float = Field(3600, gt=0, description="a render that moves nothing for this long (no actor "
                                   "started, no model call, no row finished) stops with the reason")
    collapse_duplicate_prompts: bool = Field(False, description="render one video per distinct prompt and seed: a row "
                                             "whose prompt (after NFKC, case folding and whitespace) and explicit "
                                             "seed repeat an earlier row's is skipped, naming that row")
    lease_ttl_s: float = Field(120, gt=0, description="a run holds its output prefix with a lease renewed every "
                               "third of this; a lease not renewed for this long (a killed driver) is taken over")

    @model_validator(mode="before")
    @classmethod
    def _images_next_to_the_manifest(cls, data: Any) -> Any:
        """The default image prefix is the manifest's location, resolved here, where the job is written
        (a relative manifest path means the driver's directory, not a worker's)."""
        if not isinstance(data, dict) or not isinstance(data.get("manifest"), str):
            return data
        images = data.get("images")
        if isinstance(images, ImagePolicy):
            images = images.for_manifest(data["manifest"])
        elif images is None or (isinstance(images, dict) and images.get("prefixes") is None):
            images = {**(images or {}), "prefixes": [manifest_location(data["manifest"])]}
        return {**data, "images": images}

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, gpu: str | None) -> str | None:
        if gpu is not None:
            get_gpu(gpu)
        return gpu

    @field_validator("costs")
    @classmethod
    def _readable_costs(cls, costs: str | None) -> str | None:
        if costs is not None:
            try:
                parse_costs(costs)
            except CostError as err:
                raise ValueError(str(err)) from None
        return costs

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> RenderJob:
        """A YAML job file with flags on top (`overrides` in the file's nesting, e.g. models={"preset": "tiny"})."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(_merge(data, overrides))


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
