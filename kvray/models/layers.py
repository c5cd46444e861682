"""Building blocks shared by the two U-Net3Ds (the Kandinsky 3 spatial skeleton).

Module and attribute names mirror the official code so that state-dict keys are the official ones.
Every tensor inside a U-Net is laid out `(b t) c h w`: b videos (or guidance branches) of t frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class SinusoidalPosEmb(nn.Module):
    """`[sin(x f), cos(x f)]` with `f_j = exp(-j ln(10000) / (dim/2 - 1))`: the official frequencies."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half_dim = self.dim // 2
        freqs = torch.exp(torch.arange(half_dim, device=x.device) * (-math.log(10000) / (half_dim - 1)))
        angles = rearrange(x, "i -> i 1") * rearrange(freqs, "j -> 1 j")  # (b,) -> (b, dim/2)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class EmbeddingMLP(nn.Sequential):
    """Sinusoidal features -> Linear -> SiLU -> Linear (state keys `.1`, `.3`), for every scalar condition.

    The features are computed in float32 (timesteps reach 999) and cast to the weights' dtype, so a
    half-precision network runs without autocast.
    """

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__(SinusoidalPosEmb(in_dim), nn.Linear(in_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self[0](x.float()).to(self[1].weight.dtype)
        return self[3](self[2](self[1](features)))


class ConditionalGroupNorm(nn.Module):
    """GroupNorm without affine, then `(1 + scale)` and `shift` predicted from an embedding."""

    def __init__(self, groups: int, num_channels: int, embed_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, num_channels, affine=False)
        self.context_mlp = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * num_channels))

    def forward(self, x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        modulation = self.context_mlp(embed)
        modulation = modulation.reshape(*modulation.shape, *([1] * (x.ndim - 2)))  # b 2c -> b 2c 1 .. 1
        scale, shift = modulation.chunk(2, dim=1)
        return self.norm(x) * (scale + 1.0) + shift


class Attention(nn.Module):
    """Multi-head attention without biases; used for self-, cross-, pooling and temporal attention."""

    def __init__(self, in_channels: int, out_channels: int, context_dim: int, head_dim: int = 64):
        super().__init__()
        if out_channels % head_dim:
            raise ValueError(f"attention width {out_channels} is not a multiple of head_dim {head_dim}")
        self.num_heads = out_channels // head_dim
        self.to_query = nn.Linear(in_channels, out_channels, bias=False)
        self.to_key = nn.Linear(context_dim, out_channels, bias=False)
        self.to_value = nn.Linear(context_dim, out_channels, bias=False)
        self.output_layer = nn.Linear(out_channels, out_channels, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: b n c, context: b m c' -> b n out
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)
        query, key, value = split(self.to_query(x)), split(self.to_key(context)), split(self.to_value(context))
        mask = None if context_mask is None else rearrange(context_mask.bool(), "b m -> b 1 1 m")
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.output_layer(rearrange(out, "b h n d -> b n (h d)"))


class AttentionPolling(nn.Module):
    """Adds attention-pooled text (query: the mean of every context position, pads included) to the time embedding.

    `context_lengths` serves batches of prompts padded to one length: the official network saw each
    prompt's context cut to its own length, and the mean divides by that length, so a prompt pools
    the same whatever it is batched with.
    """

    def __init__(self, num_channels: int, context_dim: int, head_dim: int = 64):
        super().__init__()
        self.attention = Attention(context_dim, num_channels, context_dim, head_dim)

    def forward(self, x, context, context_mask=None, context_lengths=None):
        if context_lengths is None:
            query = context.mean(dim=1, keepdim=True)
        else:
            query = context.sum(dim=1, keepdim=True) / rearrange(context_lengths.to(context.dtype), "b -> b 1 1")
        pooled = self.attention(query, context, context_mask)  # b 1 c
        return x + pooled.squeeze(1)


def feed_forward(num_channels: int, expansion_ratio: int) -> nn.Sequential:
    hidden = expansion_ratio * num_channels
    return nn.Sequential(
        nn.Conv2d(num_channels, hidden, kernel_size=1, bias=False),
        nn.SiLU(),
        nn.Conv2d(hidden, num_channels, kernel_size=1, bias=False),
    )


class AttentionBlock(nn.Module):
    """Spatial self-attention (no context) or cross-attention to the text, then a 1x1 feed-forward."""

    def __init__(self, num_channels, time_embed_dim, context_dim=None, norm_groups=32, head_dim=64, expansion_ratio=4):
        super().__init__()
        self.in_norm = ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.attention = Attention(num_channels, num_channels, context_dim or num_channels, head_dim)
        self.out_norm = ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.feed_forward = feed_forward(num_channels, expansion_ratio)

    def forward(self, x, time_embed, context=None, context_mask=None):
        height = x.shape[-2]
        out = rearrange(self.in_norm(x, time_embed), "b c h w -> b (h w) c")
        out = self.attention(out, out if context is None else context, context_mask)
        x = x + rearrange(out, "b (h w) c -> b c h w", h=height)
        return x + self.feed_forward(self.out_norm(x, time_embed))


class Identity(nn.Module):
    """A switched-off optional layer: returns its first argument, whatever else it is called with."""

    def forward(self, x, *args, **kwargs):
        return x


class Frames:
    """How a `(b t)` batch splits into clips, and which clips may mix information across t.

    `gate` (one value per sample, or None for all ones) scales every gated temporal layer: the
    interpolation U-Net switches temporal mixing off for its unconditional half this way.
    """

    def __init__(self, num_frames: int, gate: torch.Tensor | None = None):
        self.num_frames = num_frames
        self.gate = gate

    def to_clips(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "(b t) c h w -> b c t h w", t=self.num_frames)

    def from_clips(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b c t h w -> (b t) c h w")

    def blend(self, x: torch.Tensor, out: torch.Tensor, merge: torch.Tensor) -> torch.Tensor:
        """`(1 - m) x + m out` with `m = merge * gate` per sample."""
        if self.gate is not None:
            merge = merge * rearrange(self.gate.to(x.dtype), "b -> b 1 1 1")
        return (1 - merge) * x + merge * out


class TemporalConv3D(nn.Module):
    """Conv3d (3,1,1) across frames, blended into x by a learnt scalar gate (interpolation U-Net)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.temporal_merge = nn.Parameter(torch.zeros(1))
        self.temporal_projection = nn.Conv3d(in_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, frames: Frames) -> torch.Tensor:
        out = frames.from_clips(self.temporal_projection(frames.to_clips(x)))
        return frames.blend(x, out, self.temporal_merge)


def _temporal_or_identity(enabled: bool, channels: int) -> nn.Module:
    return TemporalConv3D(channels, channels) if enabled else Identity()


class Block(nn.Module):
    """CGN -> SiLU -> [ConvTranspose x2] -> Conv(k) -> [Conv stride 2].

    `resample` is "up", "down" or None. The interpolation U-Net adds gated Conv3d layers
    (`temporal_conv`: after the main conv; `new_temporal_params`: after the resampling).
    """

    def __init__(self, in_channels, out_channels, time_embed_dim, kernel_size=3, norm_groups=32, resample=None,
                 temporal_conv=False, new_temporal_params=False):
        super().__init__()
        self.group_norm = ConditionalGroupNorm(norm_groups, in_channels, time_embed_dim)
        self.activation = nn.SiLU()
        self.up_sample = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2) if resample == "up" else Identity()
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size, padding=0 if kernel_size == 1 else 1)
        self.down_sample = nn.Conv2d(out_channels, out_channels, 2, stride=2) if resample == "down" else Identity()
        self.temporal_post_upsample = _temporal_or_identity(new_temporal_params and resample == "up", out_channels)
        self.temporal_projection_new = _temporal_or_identity(temporal_conv, out_channels)
        self.temporal_post_downsample = _temporal_or_identity(new_temporal_params and resample == "down", out_channels)

    def forward(self, x, time_embed, frames: Frames | None = None):
        x = self.up_sample(self.activation(self.group_norm(x, time_embed)))
        x = self.temporal_post_upsample(x, frames)
        x = self.temporal_projection_new(self.projection(x), frames)
        x = self.temporal_post_downsample(self.down_sample(x), frames)
        return x


class ResNetBlock(nn.Module):
    """Bottleneck residual block: four Blocks with kernels 1,3,3,1; resampling in the 2nd (up) / 3rd (down)."""

    def __init__(self, in_channels, out_channels, time_embed_dim, norm_groups=32, compression_ratio=2, resample=None,
                 temporal_conv=False, new_temporal_params=False):
        super().__init__()
        hidden = max(in_channels, out_channels) // compression_ratio
        channels = [(in_channels, hidden), (hidden, hidden), (hidden, hidden), (hidden, out_channels)]
        # The official up-sampling sits in Block 1 and the down-sampling in Block 2.
        resamples = [None, "up" if resample == "up" else None, "down" if resample == "down" else None, None]
        self.resnet_blocks = nn.ModuleList([
            Block(c_in, c_out, time_embed_dim, kernel, norm_groups, block_resample, temporal_conv, new_temporal_params)
            for (c_in, c_out), kernel, block_resample in zip(channels, (1, 3, 3, 1), resamples)
        ])
        self.shortcut_up_sample = (
            nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2) if resample == "up" else Identity()
        )
        self.shortcut_projection = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else Identity()
        )
        self.shortcut_down_sample = (
            nn.Conv2d(out_channels, out_channels, 2, stride=2) if resample == "down" else Identity()
        )
        self.temporal_post_upsample = _temporal_or_identity(new_temporal_params and resample == "up", in_channels)
        # Built (its weights are in the checkpoints) but never applied: see forward.
        self.temporal_post_downsample = _temporal_or_identity(new_temporal_params and resample == "down", out_channels)

    def forward(self, x, time_embed, frames: Frames | None = None):
        out = x
        for block in self.resnet_blocks:
            out = block(out, time_embed, frames)
        shortcut = self.temporal_post_upsample(self.shortcut_up_sample(x), frames)
        shortcut = self.shortcut_down_sample(self.shortcut_projection(shortcut))
        # Official quirk, kept: the shortcut applies temporal_post_upsample a second time here and
        # never temporal_post_downsample.
        shortcut = self.temporal_post_upsample(shortcut, frames)
        return shortcut + out


def build_levels(cfg, down_block, up_block) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The down and up paths of the Kandinsky 3 skeleton (kept as two top-level lists: official keys).

    Up level k mirrors down level (last - k) and concatenates that level's output, except at the bottom.
    `down_block(c_in, c_out, context_dim, num_blocks, down_sample, self_attention)` and
    `up_block(c_in, cat_dim, c_out, context_dim, num_blocks, up_sample, self_attention)` build one level.
    """
    dims = cfg.hidden_dims
    levels = list(zip(dims[:-1], dims[1:], cfg.num_blocks, cfg.add_cross_attention, cfg.add_self_attention))
    text = lambda cross: cfg.context_dim if cross else None
    last = cfg.num_levels - 1
    down_samples = nn.ModuleList([
        down_block(c_in, c_out, text(cross), blocks, level != last, self_attn)
        for level, (c_in, c_out, blocks, cross, self_attn) in enumerate(levels)
    ])
    up_samples = nn.ModuleList([
        up_block(c_out, 0 if k == 0 else c_out, c_in, text(cross), blocks, k != 0, self_attn)
        for k, (c_in, c_out, blocks, cross, self_attn) in enumerate(reversed(levels))
    ])
    return down_samples, up_samples


def run_levels(down_samples: nn.ModuleList, up_samples: nn.ModuleList, x: torch.Tensor, *conditions) -> torch.Tensor:
    """Down the levels keeping each output but the last, then up, concatenating them in reverse."""
    skips = []
    for level, down in enumerate(down_samples):
        x = down(x, *conditions)
        if level != len(down_samples) - 1:
            skips.append(x)
    for level, up in enumerate(up_samples):
        if level != 0:
            x = torch.cat([x, skips.pop()], dim=1)
        x = up(x, *conditions)
    return x
