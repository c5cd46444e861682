"""Named model presets: `kv11` is exactly the official Kandinsky Video 1.1, `tiny` is CPU test scale."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict

from .arch import (
    ArchConfig,
    InterpolationUNetConfig,
    KeyframeUNetConfig,
    MoVQConfig,
    T5Config,
    TextEncoderConfig,
)

PresetName = Literal["kv11", "tiny", "toy"]


class ModelPreset(ArchConfig):
    """Every network of the system, plus where its tokenizer comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    text_encoder: TextEncoderConfig
    keyframe_unet: KeyframeUNetConfig
    interpolation_unet: InterpolationUNetConfig
    image_movq: MoVQConfig
    video_movq: MoVQConfig
    # "byt5" needs no files (tiny preset); otherwise a hub repo id or directory holding a T5 spiece.model.
    tokenizer: str
    # Video size when a request gives none: the official 512 x 512, or a CPU-friendly size for tiny.
    default_width: int = 512
    default_height: int = 512
    # The first frame of text2video is drawn at this many times the video's latent size, decoded and resized
    # (official: 2, a quirk that costs 4x the first frame's compute; the toy draws it at the video's size).
    first_frame_scale: int = 2
    # What the keyframe U-Net predicts, in both modes (it is how the network was trained, so it belongs to
    # the weights). kv11 predicts epsilon; the toy predicts v: on a schedule with zero terminal SNR an
    # epsilon network's first x0 guesses are its error times up to 34 (at t = 980), which a small model
    # cannot make small, and its keyframes' brightness then follows each frame's initial noise.
    keyframe_prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    # What the interpolation U-Net predicts. kv11 predicts v; the toy predicts the frames themselves (x0):
    # its frames between keyframes are close to a blend of their neighbours at every noise level, a target
    # a small network learns in hundreds of steps, while on the v target (dominated at low noise by each
    # frame's own noise, 12 channels of it) 900 steps left it drawing noise (docs/training.md).
    interpolation_prediction: Literal["v_prediction", "sample"] = "v_prediction"

    @property
    def latent_factor(self) -> int:
        """Pixels per latent, each way: the MoVQ halves the image between its levels (8 for kv11)."""
        return 2 ** (len(self.image_movq.ch_mult) - 1)


_KV11_SPATIAL = dict(
    model_channels=384,
    init_channels=192,
    time_embed_dim=1536,
    context_dim=4096,
    groups=32,
    head_dim=64,
    expansion_ratio=4,
    compression_ratio=2,
    dim_mult=(1, 2, 4, 8),
    num_blocks=(3, 3, 3, 3),
    add_cross_attention=(False, True, True, True),
    add_self_attention=(False, True, True, True),
)
_KV11_MOVQ = dict(
    double_z=False, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=256,
    ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,), dropout=0.0,
)

KV11 = ModelPreset(
    name="kv11",
    # Flan-UL2's encoder (google/flan-ul2 config.json).
    text_encoder=TextEncoderConfig(t5=T5Config(), context_dim=4096, tokens_length=128),
    keyframe_unet=KeyframeUNetConfig(
        num_channels=9, out_channels=4, noise_augmentation=True, motion_score=True, **_KV11_SPATIAL
    ),
    # configs.json is cut short in every stored copy; spec B.2 completes it (file sizes confirm).
    interpolation_unet=InterpolationUNetConfig(num_channels=20, out_channels=12, **_KV11_SPATIAL),
    image_movq=MoVQConfig(**_KV11_MOVQ),
    video_movq=MoVQConfig(temporal=True, temporal_attention_block=True, **_KV11_MOVQ),
    tokenizer="google/flan-ul2",
)

def _frames_only_video_movq(movq: dict) -> MoVQConfig:
    """The video MoVQ of the small presets: temporal convs over frames only (3,1,1), since a (3,3,3) kernel at
    full resolution would make decoding the slowest step of a small pipeline by far."""
    return MoVQConfig(temporal=True, temporal_attention_block=True, temporal_kernel_size=(3, 1, 1),
                      temporal_conv_padding=(1, 0, 0), **movq)


_TINY_SPATIAL = dict(
    model_channels=8,
    init_channels=8,
    time_embed_dim=32,
    context_dim=16,
    groups=4,
    head_dim=8,
    expansion_ratio=2,
    compression_ratio=2,
    dim_mult=(1, 2, 2, 4),
    num_blocks=(1, 1, 1, 1),
    add_cross_attention=(False, True, True, True),
    add_self_attention=(False, True, True, True),
)
_TINY_MOVQ = dict(
    double_z=False, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
    ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
)

TINY = ModelPreset(
    name="tiny",
    text_encoder=TextEncoderConfig(
        t5=T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16),
        context_dim=16,
        tokens_length=64,
    ),
    keyframe_unet=KeyframeUNetConfig(
        num_channels=9, out_channels=4, noise_augmentation=True, motion_score=True, **_TINY_SPATIAL
    ),
    interpolation_unet=InterpolationUNetConfig(num_channels=20, out_channels=12, **_TINY_SPATIAL),
    image_movq=MoVQConfig(**_TINY_MOVQ),
    video_movq=_frames_only_video_movq(_TINY_MOVQ),
    tokenizer="byt5",
    default_width=128,
    default_height=128,
)

_TOY_SPATIAL = dict(
    model_channels=32,
    init_channels=32,
    time_embed_dim=128,
    context_dim=64,
    groups=8,
    head_dim=16,
    expansion_ratio=2,
    compression_ratio=2,
    dim_mult=(1, 2, 2, 4),
    num_blocks=(1, 1, 1, 1),
    add_cross_attention=(False, True, True, True),
    # No self-attention at the two finest levels: 16x16 and 8x8 latents of one shape need none, and
    # the temporal attention rides on the same flag, so the keyframe U-Net keeps it at 4x4 and 2x2.
    add_self_attention=(False, False, True, True),
)
# A MoVQ that halves twice (64 px -> 16x16 latents): the toy world's shapes need 4 latent pixels across.
_TOY_MOVQ = dict(
    double_z=False, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
    ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
)

# The toy model: trained here by `kvray train` on the procedural toy world (`kvray.toyworld`), a few
# million parameters, 64 x 64 videos; its weights ship with the package (`kvray/toy_weights/`).
TOY = ModelPreset(
    name="toy",
    text_encoder=TextEncoderConfig(
        t5=T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=16, relative_attention_max_distance=64),
        context_dim=64,
        tokens_length=96,
    ),
    keyframe_unet=KeyframeUNetConfig(
        num_channels=9, out_channels=4, noise_augmentation=True, motion_score=True, **_TOY_SPATIAL
    ),
    interpolation_unet=InterpolationUNetConfig(num_channels=20, out_channels=12, **_TOY_SPATIAL),
    image_movq=MoVQConfig(**_TOY_MOVQ),
    video_movq=_frames_only_video_movq(_TOY_MOVQ),
    tokenizer="byt5",
    default_width=64,
    default_height=64,
    first_frame_scale=1,
    keyframe_prediction="v_prediction",
    interpolation_prediction="sample",
)

PRESETS: dict[str, ModelPreset] = {p.name: p for p in (KV11, TINY, TOY)}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
