"""The keyframe U-Net3D of Kandinsky Video 1.1 (`t2v.pt`): the Kandinsky 3 U-Net plus temporal layers.

Image mode draws the first frame: `image_in_layer`, every temporal layer off. Video mode draws the
keyframes of clips of `num_frames` frames, with temporal layers conditioned on the frame index,
the noise-augmentation level of the conditioning frame and the motion score.
"""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import nn

from ..config.arch import KeyframeUNetConfig
from .layers import (
    Attention,
    AttentionBlock,
    AttentionPolling,
    ConditionalGroupNorm,
    EmbeddingMLP,
    Frames,
    Identity,
    ResNetBlock,
    build_levels,
    feed_forward,
    run_levels,
)


class TemporalResNetBlock(nn.Module):
    """Four `CGN -> SiLU -> Conv3d(k,1,1)` steps across frames (k = 1,3,3,1), residual."""

    def __init__(self, num_channels, time_embed_dim, norm_groups=32, compression_ratio=2):
        super().__init__()
        hidden = num_channels // compression_ratio
        channels = [(num_channels, hidden), (hidden, hidden), (hidden, hidden), (hidden, num_channels)]
        self.temporal_resnet_blocks = nn.ModuleList([
            nn.ModuleList([
                ConditionalGroupNorm(norm_groups, c_in, time_embed_dim),
                nn.SiLU(),
                nn.Conv3d(c_in, c_out, (kernel, 1, 1), padding=(kernel // 2, 0, 0)),
            ])
            for (c_in, c_out), kernel in zip(channels, (1, 3, 3, 1))
        ])

    def forward(self, x, embed, frames: Frames):
        out = x
        for norm, activation, projection in self.temporal_resnet_blocks:
            out = frames.from_clips(projection(frames.to_clips(activation(norm(out, embed)))))
        return x + out


class TemporalAttentionBlock(nn.Module):
    """Attention across the frames of each clip at every pixel, then a 1x1 feed-forward."""

    def __init__(self, num_channels, time_embed_dim, norm_groups=32, head_dim=64, expansion_ratio=4):
        super().__init__()
        self.temporal_norm = ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.temporal_attention = Attention(num_channels, num_channels, num_channels, head_dim)
        self.ff_norm = ConditionalGroupNorm(norm_groups, num_channels, time_embed_dim)
        self.feed_forward = feed_forward(num_channels, expansion_ratio)

    def forward(self, x, embed, frames: Frames):
        height, width = x.shape[-2:]
        out = rearrange(self.temporal_norm(x, embed), "(b t) c h w -> (b h w) t c", t=frames.num_frames)
        out = self.temporal_attention(out, out)
        x = x + rearrange(out, "(b h w) t c -> (b t) c h w", h=height, w=width)
        return x + self.feed_forward(self.ff_norm(x, embed))


class DownSampleBlock(nn.Module):
    def __init__(self, in_channels, out_channels, context_dim, num_blocks, down_sample, self_attention, *,
                 cfg: KeyframeUNetConfig):
        super().__init__()
        e, g = cfg.time_embed_dim, cfg.groups
        self.self_attention_block = (
            AttentionBlock(in_channels, e, None, g, cfg.head_dim, cfg.expansion_ratio) if self_attention else Identity()
        )
        self.temporal_attention_block = (
            TemporalAttentionBlock(in_channels, e, g, cfg.head_dim, cfg.expansion_ratio) if self_attention else Identity()
        )
        units = []
        for index in range(num_blocks):
            last = index == num_blocks - 1
            units.append(nn.ModuleList([
                ResNetBlock(in_channels if index == 0 else out_channels, out_channels, e, g, cfg.compression_ratio),
                AttentionBlock(out_channels, e, context_dim, g, cfg.head_dim, cfg.expansion_ratio) if context_dim else Identity(),
                ResNetBlock(out_channels, out_channels, e, g, cfg.compression_ratio, "down" if last and down_sample else None),
                TemporalResNetBlock(out_channels, e, g, cfg.compression_ratio),
                TemporalResNetBlock(out_channels, e, g, cfg.compression_ratio),
            ]))
        self.resnet_attn_blocks = nn.ModuleList(units)

    def forward(self, x, time_embed, context, context_mask, temporal_embed, frames: Frames | None):
        x = self.self_attention_block(x, time_embed)
        if frames is not None:
            x = self.temporal_attention_block(x, temporal_embed, frames)
        for in_resnet, attention, out_resnet, in_temporal, out_temporal in self.resnet_attn_blocks:
            x = in_resnet(x, time_embed)
            if frames is not None:
                x = in_temporal(x, temporal_embed, frames)
            x = attention(x, time_embed, context, context_mask)
            x = out_resnet(x, time_embed)
            if frames is not None:
                x = out_temporal(x, temporal_embed, frames)
        return x


class UpSampleBlock(nn.Module):
    def __init__(self, in_channels, cat_dim, out_channels, context_dim, num_blocks, up_sample, self_attention, *,
                 cfg: KeyframeUNetConfig):
        super().__init__()
        e, g = cfg.time_embed_dim, cfg.groups
        units = []
        for index in range(num_blocks):
            channels = in_channels + cat_dim if index == 0 else in_channels
            unit_out = out_channels if index == num_blocks - 1 else in_channels
            units.append(nn.ModuleList([
                ResNetBlock(channels, channels, e, g, cfg.compression_ratio, "up" if index == 0 and up_sample else None),
                AttentionBlock(channels, e, context_dim, g, cfg.head_dim, cfg.expansion_ratio) if context_dim else Identity(),
                ResNetBlock(channels, unit_out, e, g, cfg.compression_ratio),
                TemporalResNetBlock(channels, e, g, cfg.compression_ratio),
                TemporalResNetBlock(channels, e, g, cfg.compression_ratio),
            ]))
        self.resnet_attn_blocks = nn.ModuleList(units)
        self.temporal_attention_block = (
            TemporalAttentionBlock(out_channels, e, g, cfg.head_dim, cfg.expansion_ratio) if self_attention else Identity()
        )
        self.self_attention_block = (
            AttentionBlock(out_channels, e, None, g, cfg.head_dim, cfg.expansion_ratio) if self_attention else Identity()
        )

    def forward(self, x, time_embed, context, context_mask, temporal_embed, frames: Frames | None):
        for in_resnet, attention, out_resnet, in_temporal, out_temporal in self.resnet_attn_blocks:
            if frames is not None:
                x = in_temporal(x, temporal_embed, frames)
            x = in_resnet(x, time_embed)
            x = attention(x, time_embed, context, context_mask)
            if frames is not None:
                x = out_temporal(x, temporal_embed, frames)
            x = out_resnet(x, time_embed)
        if frames is not None:
            x = self.temporal_attention_block(x, temporal_embed, frames)
        return self.self_attention_block(x, time_embed)


class KeyframeUNet(nn.Module):
    """`forward(x, time, context, context_mask, temporal_embed=None, num_frames=None, noise_aug_time=None,
    motion_score=None)`, the official argument order, plus `context_lengths` for padded batches of prompts
    (see `AttentionPolling`).

    The mode is explicit: video mode when `temporal_embed` (frame indices) is given, image mode
    otherwise. The official network chose its input layer by batch size (> 2 means video), which
    breaks as soon as several first frames are batched; choosing by mode gives the same numbers for
    every batch the official pipeline makes.
    """

    def __init__(self, config: KeyframeUNetConfig):
        super().__init__()
        self.config = cfg = config
        init, e = cfg.resolved_init_channels, cfg.time_embed_dim
        self.to_time_embed = EmbeddingMLP(init, e)
        # The learnt unconditional text token. The official files keep it beside the state dict
        # (`{'unet': ..., 'null_embedding': ...}`), so it is not part of the state dict here either.
        self.register_buffer("null_embedding", torch.zeros(cfg.context_dim), persistent=False)
        self.feature_pooling = AttentionPolling(e, cfg.context_dim, cfg.head_dim)
        self.to_temporal_embed = EmbeddingMLP(init, e)
        self.in_layer = nn.Conv2d(cfg.num_channels, init, kernel_size=3, padding=1)
        self.image_in_layer = nn.Conv2d(cfg.num_channels, init, kernel_size=3, padding=1)

        self.down_samples, self.up_samples = build_levels(
            cfg, partial(DownSampleBlock, cfg=cfg), partial(UpSampleBlock, cfg=cfg)
        )
        self.out_layer = nn.Sequential(
            nn.GroupNorm(cfg.groups, init), nn.SiLU(), nn.Conv2d(init, cfg.resolved_out_channels, kernel_size=3, padding=1)
        )
        if cfg.noise_augmentation:
            self.temporal_noise_aug_time_encoding = EmbeddingMLP(init, e)
        if cfg.motion_score:
            self.temporal_motion_score_encoding = EmbeddingMLP(init, e)

    def forward(self, x, time, context=None, context_mask=None, temporal_embed=None, num_frames=None,
                noise_aug_time=None, motion_score=None, context_lengths=None):
        # x: (b t) c h w in video mode, b c h w in image mode
        time_embed = self.to_time_embed(time)
        if context is not None:
            time_embed = self.feature_pooling(time_embed, context, context_mask, context_lengths)

        frames = temporal_cond = None
        if temporal_embed is None:
            x = self.image_in_layer(x)
        else:
            if num_frames is None:
                raise ValueError("video mode needs num_frames (frames per clip)")
            frames = Frames(num_frames)
            x = self.in_layer(x)
            temporal = self.to_temporal_embed(temporal_embed)
            if self.config.noise_augmentation and noise_aug_time is not None:
                temporal = temporal + self.temporal_noise_aug_time_encoding(noise_aug_time)
            if self.config.motion_score and motion_score is not None:
                temporal = temporal + self.temporal_motion_score_encoding(motion_score)
            # Temporal layers see the diffusion time and the temporal conditions; spatial layers only the time.
            temporal_cond = time_embed + temporal

        x = run_levels(self.down_samples, self.up_samples, x, time_embed, context, context_mask, temporal_cond, frames)
        return self.out_layer(x)
