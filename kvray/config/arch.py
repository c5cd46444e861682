"""Architecture configs: one per network, fixing every weight shape.

Field names are the official constructors' keyword arguments, so an official config
(`configs.json` on the hub, or a golden file's `config`) validates as it is.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Positive = Annotated[int, Field(gt=0)]
FourFlags = tuple[bool, bool, bool, bool]


class ArchConfig(BaseModel):
    """Frozen, strict about unknown keys: a typo in a config must never build a different network."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class _UNetSpatial(ArchConfig):
    """The Kandinsky 3 spatial skeleton that both U-Net3Ds share."""

    model_channels: Positive
    init_channels: Positive | None = None
    num_channels: Positive
    out_channels: Positive | None = None
    time_embed_dim: Positive
    context_dim: Positive
    groups: Positive = 32
    head_dim: Positive = 64
    expansion_ratio: Positive = 4
    compression_ratio: Positive = 2
    dim_mult: tuple[Positive, ...] = (1, 2, 4, 8)
    num_blocks: tuple[Positive, ...] = (3, 3, 3, 3)
    add_cross_attention: tuple[bool, ...] = (False, True, True, True)
    add_self_attention: tuple[bool, ...] = (False, True, True, True)

    @model_validator(mode="after")
    def _levels_agree(self):
        levels = {len(self.dim_mult), len(self.num_blocks), len(self.add_cross_attention), len(self.add_self_attention)}
        if len(levels) != 1:
            raise ValueError(
                "dim_mult, num_blocks, add_cross_attention and add_self_attention need one entry per level, "
                f"got lengths {len(self.dim_mult)}, {len(self.num_blocks)}, "
                f"{len(self.add_cross_attention)}, {len(self.add_self_attention)}"
            )
        return self

    @property
    def resolved_init_channels(self) -> int:
        return self.init_channels or self.model_channels

    @property
    def hidden_dims(self) -> list[int]:
        return [self.resolved_init_channels, *(self.model_channels * m for m in self.dim_mult)]

    @property
    def num_levels(self) -> int:
        return len(self.dim_mult)


class KeyframeUNetConfig(_UNetSpatial):
    """`kandinsky_video.model.unet.UNet`: the T2V keyframe U-Net3D (image and video mode)."""

    network: Literal["keyframe_unet"] = "keyframe_unet"
    num_channels: Positive = 9
    out_channels: Positive | None = 4
    noise_augmentation: bool = False
    motion_score: bool = False

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.num_channels


class InterpolationUNetConfig(_UNetSpatial):
    """`kandinsky_video.model.unet_interpolation.UNet`: inserts 3 latent frames between two keyframes."""

    network: Literal["interpolation_unet"] = "interpolation_unet"
    num_channels: Positive = 20
    out_channels: Positive = 12
    time_downsample: tuple[bool, ...] = (False, False, False, False)
    temporal: bool = True
    use_perturbation_time_embed: bool = True
    merge_perturbation_time_with_diffusion_time: bool = True
    merge_perturbation_time_with_context: bool = False
    pass_skip_frames: bool = True
    temporal_type: Literal["conv3D"] = "conv3D"
    add_new_temporal_params: bool = False
    add_temporal_attention: bool = True

    @model_validator(mode="after")
    def _no_time_downsample(self):
        # The official forward cannot run with time_downsample on (CompressTemporal halves the batch while
        # the time embedding keeps it whole), so no released checkpoint uses it.
        if any(self.time_downsample):
            raise ValueError("time_downsample=True is not supported: the official network cannot run with it")
        if len(self.time_downsample) != self.num_levels:
            raise ValueError(f"time_downsample needs {self.num_levels} entries, got {len(self.time_downsample)}")
        return self

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels


class MoVQConfig(ArchConfig):
    """`kandinsky_video.movq.MoVQ`: the image MoVQ, and with the temporal flags on, the video MoVQ."""

    network: Literal["movq"] = "movq"
    # double_z would need a quant_conv of 2 * z_channels inputs: no official MoVQ can run with it.
    double_z: Literal[False] = False
    z_channels: Positive = 4
    resolution: Positive = 256
    in_channels: Positive = 3
    out_ch: Positive = 3
    ch: Positive = 256
    ch_mult: tuple[Positive, ...] = (1, 2, 2, 4)
    num_res_blocks: Positive = 2
    attn_resolutions: tuple[Positive, ...] = (32,)
    dropout: float = 0.0
    temporal: bool = False
    temporal_mid_blocks: bool = True
    temporal_kernel_size: tuple[Positive, Positive, Positive] = (3, 3, 3)
    temporal_conv_padding: tuple[int, int, int] = (1, 1, 1)
    temporal_attention_block: bool = False
    temporal_blocks: bool = False
    flicker_augmentation: bool = False
    build_3D_decoder: Literal[False] = False
    add_conv: bool = False

    @model_validator(mode="after")
    def _groups_fit(self):
        # MoVQ's Normalize hard-codes 32 groups.
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % 32 for w in widths):
            raise ValueError(f"every MoVQ width must be a multiple of 32 (GroupNorm(32)), got {widths}")
        return self

    @property
    def is_temporal(self) -> bool:
        return self.temporal or self.temporal_attention_block or self.temporal_blocks


class T5Config(ArchConfig):
    """The T5 encoder hyperparameters we build; transformers' `T5Config` receives these fields."""

    model_config = ConfigDict(frozen=True, extra="allow")

    vocab_size: Positive = 32128
    d_model: Positive = 4096
    d_kv: Positive = 256
    d_ff: Positive = 16384
    num_layers: Positive = 32
    num_heads: Positive = 16
    relative_attention_num_buckets: Positive = 32
    relative_attention_max_distance: Positive = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-silu"
    dropout_rate: float = 0.0

    def to_transformers(self) -> dict[str, Any]:
        return self.model_dump()


class TextEncoderConfig(ArchConfig):
    """`T5TextConditionEncoder`: a T5 encoder plus the `projection_base` / `projection_interpolation` heads."""

    network: Literal["text_encoder"] = "text_encoder"
    t5: T5Config = T5Config()
    context_dim: Positive = 4096
    tokens_length: Positive = 128
