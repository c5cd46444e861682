"""The interpolation U-Net3D of Kandinsky Video 1.1 (`interpolation.pt`).

It predicts (v-prediction) the 3 latent frames between two keyframes: input channels are
`[left keyframe | 3 noisy frames | right keyframe]`. A call denoises G groups at once and its
temporal layers mix information across neighbouring *groups*: the batch is `(b t)` with t = G
(b = 2 for the conditional and unconditional halves of classifier-free guidance).
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import nn

from ..config.arch import InterpolationUNetConfig
from .layers import (
    Attention,
    AttentionBlock,
    AttentionPolling,
    ConditionalGroupNorm,
    EmbeddingMLP,
    Frames,
    Identity,
    ResNetBlock,
    SinusoidalPosEmb,
    TemporalConv3D,
    build_levels,
    feed_forward,
    run_levels,
)

# The skip-frames embedding table has 20 rows in the official network.
NUM_SKIP_EMBEDDINGS = 20


class GatedTemporalAttentionBlock(nn.Module):
    """Attention across groups at every pixel and a feed-forward, each blended in by `merge * mask`."""

    def __init__(self, num_channels, time_embed_dim, norm_groups=32, head_dim=64, expansion_ratio=4):
        super().__init__()
        self.in_norm = ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.attention = Attention(num_channels, num_channels, num_channels, head_dim)
        self.out_norm = ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.feed_forward = feed_forward(num_channels, expansion_ratio)
        self.temporal_merge1 = nn.Parameter(torch.zeros(1))
        self.temporal_merge2 = nn.Parameter(torch.zeros(1))

    def forward(self, x, time_embed, frames: Frames):
        height, width = x.shape[-2:]
        out = rearrange(self.in_norm(x, time_embed), "(b t) c h w -> (b h w) t c", t=frames.num_frames)
        out = rearrange(self.attention(out, out), "(b h w) t c -> (b t) c h w", h=height, w=width)
        x = frames.blend(x, out, self.temporal_merge1)
        return frames.blend(x, self.feed_forward(self.out_norm(x, time_embed)), self.temporal_merge2)


class _Level(nn.Module):
    """One U-Net level: `[ResNet, cross-attention, ResNet]` units plus self- and temporal attention."""

    def __init__(self, cfg: InterpolationUNetConfig, attention_channels, units, context_dim, self_attention):
        super().__init__()
        e, g = cfg.time_embed_dim, cfg.groups
        temporal = dict(temporal_conv=cfg.temporal, new_temporal_params=cfg.add_new_temporal_params)
        self.self_attention_block = (
            AttentionBlock(attention_channels, e, None, g, cfg.head_dim, cfg.expansion_ratio) if self_attention else Identity()
        )
        self.temporal_attention_block = (
            GatedTemporalAttentionBlock(attention_channels, e, g, cfg.head_dim, cfg.expansion_ratio)
            if self_attention and cfg.add_temporal_attention else Identity()
        )
        self.resnet_attn_blocks = nn.ModuleList([
            nn.ModuleList([
                ResNetBlock(c_in, c_mid, e, g, cfg.compression_ratio, resample_in, **temporal),
                AttentionBlock(c_mid, e, context_dim, g, cfg.head_dim, cfg.expansion_ratio) if context_dim else Identity(),
                ResNetBlock(c_mid, c_out, e, g, cfg.compression_ratio, resample_out, **temporal),
            ])
            for c_in, c_mid, c_out, resample_in, resample_out in units
        ])

    def _units(self, x, time_embed, context, context_mask, frames):
        for in_resnet, attention, out_resnet in self.resnet_attn_blocks:
            x = in_resnet(x, time_embed, frames)
            x = attention(x, time_embed, context, context_mask)
            x = out_resnet(x, time_embed, frames)
        return x

    def _attend(self, x, time_embed, frames):
        x = self.self_attention_block(x, time_embed)
        return self.temporal_attention_block(x, time_embed, frames)


class DownSampleBlock(_Level):
    def __init__(self, in_channels, out_channels, context_dim, num_blocks, down_sample, self_attention, *, cfg):
        units = [
            (in_channels if i == 0 else out_channels, out_channels, out_channels, None,
             "down" if down_sample and i == num_blocks - 1 else None)
            for i in range(num_blocks)
        ]
        super().__init__(cfg, in_channels, units, context_dim, self_attention)

    def forward(self, x, time_embed, context, context_mask, frames):
        return self._units(self._attend(x, time_embed, frames), time_embed, context, context_mask, frames)


class UpSampleBlock(_Level):
    def __init__(self, in_channels, cat_dim, out_channels, context_dim, num_blocks, up_sample, self_attention, *, cfg):
        units = [
            (c, c, out_channels if i == num_blocks - 1 else in_channels, "up" if up_sample and i == 0 else None, None)
            for i, c in enumerate([in_channels + cat_dim] + [in_channels] * (num_blocks - 1))
        ]
        super().__init__(cfg, out_channels, units, context_dim, self_attention)

    def forward(self, x, time_embed, context, context_mask, frames):
        return self._attend(self._units(x, time_embed, context, context_mask, frames), time_embed, frames)


class InterpolationUNet(nn.Module):
    """`forward(x, time, context, context_mask, temporal_embed=None, num_predicted_groups=None,
    perturbation_time=None, skip_frames=None, temporal_mask=None)`, the official signature, plus
    `context_lengths` for padded batches of prompts (see `AttentionPolling`).

    `temporal_embed` is accepted for signature compatibility and unused, as in the official network.
    """

    def __init__(self, config: InterpolationUNetConfig):
        super().__init__()
        self.config = cfg = config
        init, e = cfg.resolved_init_channels, cfg.time_embed_dim
        self.to_time_embed = EmbeddingMLP(init, e)
        # The learnt unconditional text token. The official files keep it beside the state dict
        # (`{'unet': ..., 'null_embedding': ...}`), so it is not part of the state dict here either.
        self.register_buffer("null_embedding", torch.zeros(cfg.context_dim), persistent=False)
        # Perturbation of the conditioning frames ("Align your Latents"), merged into the diffusion time.
        if cfg.use_perturbation_time_embed and cfg.merge_perturbation_time_with_diffusion_time:
            self.perturbation_to_time_embed = EmbeddingMLP(init, e)
            self.time_embed_merge = nn.Parameter(torch.zeros(1))
        if cfg.use_perturbation_time_embed and cfg.merge_perturbation_time_with_context:
            self.time_embed_context_merge = nn.Parameter(torch.zeros(1))
            self.perturbation_time_encoding = SinusoidalPosEmb(cfg.context_dim)
        if cfg.pass_skip_frames:
            self.skip_merge = nn.Parameter(torch.zeros(1))
            # nn.Embedding's own init (normal_) imports torch._dynamo on the meta device, about 2 s of every
            # interpolation actor's start; randn draws the same values.
            self.skip_embeddings = nn.Embedding(NUM_SKIP_EMBEDDINGS, e, _weight=torch.randn(NUM_SKIP_EMBEDDINGS, e))
        self.feature_pooling = AttentionPolling(e, cfg.context_dim, cfg.head_dim)
        self.in_layer = nn.Conv2d(cfg.num_channels, init, kernel_size=3, padding=1)

        self.down_samples, self.up_samples = build_levels(
            cfg, partial(DownSampleBlock, cfg=cfg), partial(UpSampleBlock, cfg=cfg)
        )
        self.out_layer = nn.Sequential(
            nn.GroupNorm(cfg.groups, init), nn.SiLU(), nn.Conv2d(init, cfg.out_channels, kernel_size=3, padding=1)
        )
        self.temporal_conv_in = TemporalConv3D(init, init) if cfg.add_new_temporal_params else Identity()
        self.temporal_conv_out = TemporalConv3D(init, init) if cfg.add_new_temporal_params else Identity()

    def forward(self, x, time, context, context_mask=None, temporal_embed=None, num_predicted_groups=None,
                perturbation_time=None, skip_frames=None, temporal_mask=None, context_lengths=None):
        # x: (b t) c h w with t = num_predicted_groups
        if num_predicted_groups is None:
            raise ValueError("the interpolation U-Net needs num_predicted_groups (groups per guidance branch)")
        batch = x.shape[0]
        frames = Frames(num_predicted_groups, temporal_mask)
        # Official defaults when the caller leaves them out.
        if perturbation_time is None:
            perturbation_time = torch.full((batch,), 25.0, device=x.device)
        if skip_frames is None:
            skip_frames = torch.ones(batch, dtype=torch.int32, device=x.device)

        cfg = self.config
        time_embed = self.to_time_embed(time)
        if cfg.use_perturbation_time_embed and cfg.merge_perturbation_time_with_diffusion_time:
            merge = self.time_embed_merge
            time_embed = merge * self.perturbation_to_time_embed(perturbation_time) + (1 - merge) * time_embed
        if cfg.use_perturbation_time_embed and cfg.merge_perturbation_time_with_context:
            perturbation = rearrange(self.perturbation_time_encoding(perturbation_time), "b c -> b 1 c").to(context.dtype)
            context = context + self.time_embed_context_merge * perturbation
        if cfg.pass_skip_frames:
            time_embed = self.skip_merge * self.skip_embeddings(skip_frames) + time_embed
        time_embed = self.feature_pooling(time_embed, context, context_mask, context_lengths)

        x = self.temporal_conv_in(self.in_layer(x), frames)
        x = run_levels(self.down_samples, self.up_samples, x, time_embed, context, context_mask, frames)
        return self.out_layer(self.temporal_conv_out(x, frames))
