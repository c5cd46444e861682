"""MoVQ: the image autoencoder (`movq.pt`) and, with the temporal flags on, the video decoder (`video_movq.pt`).

There is no quantiser: `encode` returns the continuous 4-channel latent and `decode` conditions every
decoder norm on that same latent (`zq = z`). A decoded batch `(b t) c h w` is one clip (b = 1): the
temporal layers mix all of its frames, so the pipeline decodes a video chunk by chunk.

Module and attribute names mirror the official `kandinsky_video/movq.py`, so the published state dicts
load strictly with no key map. The official per-sample Python loops are batched here: every op they
wrap acts on each sample alone, except where a quirk below says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config.arch import MoVQConfig
from .layers import Frames, Identity


class SpatialNorm(nn.Module):
    """GroupNorm(32, eps 1e-6); given `zq_channels`, modulated by the latent zq resized to the features.

    `norm(f) * conv_y(zq') + conv_b(zq')` with zq' = nearest-resized zq, passed through `conv` if `add_conv`.
    """

    def __init__(self, channels: int, zq_channels: int | None = None, add_conv: bool = False):
        super().__init__()
        self.norm_layer = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
        if zq_channels is not None:
            self.conv = nn.Conv2d(zq_channels, zq_channels, 3, padding=1) if add_conv else nn.Identity()
            self.conv_y = nn.Conv2d(zq_channels, channels, 1)
            self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        out = self.norm_layer(f)
        if zq is None:
            return out
        zq = self.conv(F.interpolate(zq, size=f.shape[-2:], mode="nearest"))
        return out * self.conv_y(zq) + self.conv_b(zq)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """3x3 conv, stride 2, on the input zero-padded by one row and column at the bottom and right only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResnetBlock(nn.Module):
    """(norm -> SiLU -> conv) twice, plus the input (through `nin_shortcut` when the width changes).

    Video decoder options:
    * `temporal_mix=(kernel_size, padding)`: after each conv, `h = (1 - m) h + m conv3d(h)` over the frames of
      the clip, with learnt scalars m (`temporal_merge1/2`, zero at init like the projections, so a fresh
      block is the image block);
    * `flicker_augmentation`: the conv3d inputs (not the kept h) get a per-frame embedding of `aug_emb`;
    * `across_frames`: the two convs themselves are Conv3d (3,1,1) over the frames - the official
      `TemporalResnetBlock`.
    """

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0, zq_channels: int | None = None,
                 add_conv: bool = False, temporal_mix: tuple[Sequence[int], Sequence[int]] | None = None,
                 flicker_augmentation: bool = False, across_frames: bool = False):
        super().__init__()
        if across_frames:
            conv = partial(nn.Conv3d, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        else:
            conv = partial(nn.Conv2d, kernel_size=3, padding=1)
        self.across_frames = across_frames
        self.norm1 = SpatialNorm(in_channels, zq_channels, add_conv)
        self.conv1 = conv(in_channels, out_channels)
        self.norm2 = SpatialNorm(out_channels, zq_channels, add_conv)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else Identity()
        self.temporal = temporal_mix is not None
        if self.temporal:
            kernel_size, padding = temporal_mix
            projection = partial(nn.Conv3d, out_channels, out_channels, tuple(kernel_size), padding=tuple(padding))
            self.temporal_merge1 = nn.Parameter(torch.zeros(1))
            self.temporal_projection1 = projection()
            self.temporal_merge2 = nn.Parameter(torch.zeros(1))
            self.temporal_projection2 = projection()
            for conv3d in (self.temporal_projection1, self.temporal_projection2):
                nn.init.zeros_(conv3d.weight)
                nn.init.zeros_(conv3d.bias)
            self.temporal_flicker_proj = nn.Linear(1, out_channels) if flicker_augmentation else None

    def forward(self, x, zq=None, frames: Frames | None = None, aug_emb=None):
        h = self._conv(self.conv1, F.silu(self.norm1(x, zq)), frames)
        if self.temporal:
            h = self._mix(h, self.temporal_merge1, self.temporal_projection1, frames, aug_emb)
        h = self._conv(self.conv2, self.dropout(F.silu(self.norm2(h, zq))), frames)
        if self.temporal:
            h = self._mix(h, self.temporal_merge2, self.temporal_projection2, frames, aug_emb)
        return self.nin_shortcut(x) + h

    def _conv(self, conv, h, frames):
        return frames.from_clips(conv(frames.to_clips(h))) if self.across_frames else conv(h)

    def _mix(self, h, merge, projection, frames, aug_emb):
        out = h
        if self.temporal_flicker_proj is not None and aug_emb is not None:
            out = out + rearrange(self.temporal_flicker_proj(aug_emb), "b t c -> (b t) c 1 1")  # aug_emb: b t 1
        out = frames.from_clips(projection(frames.to_clips(out)))
        return frames.blend(h, out, merge)


class AttnBlock(nn.Module):
    """Single-head self-attention with 1x1 q/k/v/proj_out, residual.

    Over the pixels of each frame, or with `temporal` over the frames of the clip at each pixel (the
    official `TemporalAttnBlock`, same weights).
    """

    def __init__(self, channels: int, zq_channels: int | None = None, add_conv: bool = False, temporal: bool = False):
        super().__init__()
        self.temporal = temporal
        self.norm = SpatialNorm(channels, zq_channels, add_conv)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x, zq=None, frames: Frames | None = None):
        height, width = x.shape[-2:]
        # A head axis of one keeps the fused SDPA kernels eligible (the attention matrix is large at full size).
        if self.temporal:
            tokens, sizes = "(b t) c h w -> (b h w) 1 t c", {"t": frames.num_frames}
            # Official quirk: TemporalAttnBlock is called without zq, so its norm is a plain GroupNorm and
            # its conv_y / conv_b (and conv) weights are never used.
            zq = None
        else:
            tokens, sizes = "b c h w -> b 1 (h w) c", {}
            if zq is not None:
                # Official quirk (1.1 AttnBlock): a one-frame SpatialNorm is handed the whole zq batch and
                # takes its first entry, so every frame is modulated with the first frame's latent.
                zq = zq[:1]
        h = self.norm(x, zq)
        q, k, v = (rearrange(proj(h), tokens, **sizes) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale c^-1/2, as the official
        source, target = tokens.split(" -> ")
        return x + self.proj_out(rearrange(out, f"{target} -> {source}", h=height, w=width, **sizes))


class Encoder(nn.Module):
    """conv_in, levels of ResnetBlocks (+ AttnBlocks at `attn_resolutions`) with Downsample between, mid, out."""

    def __init__(self, config: MoVQConfig):
        super().__init__()
        block = partial(ResnetBlock, dropout=config.dropout)
        widths = [config.ch * m for m in config.ch_mult]
        resolution = config.resolution
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = config.ch
        for i_level, block_out in enumerate(widths):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(config.num_res_blocks):
                level.block.append(block(block_in, block_out))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level == len(widths) - 1:
                level.downsample = Identity()
            else:
                level.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = block(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = block(block_in, block_in)
        self.norm_out = SpatialNorm(block_in)
        z_channels = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if level.attn:
                    h = level.attn[i](h)
            h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """The official `MOVQDecoder`: every norm is a SpatialNorm on zq; temporal layers per the config flags.

    Order: mid = block_1, attn_1, temporal_attn_1, temporal_block_1, block_2, temporal_block_2; then per
    level, per block: ResnetBlock, temporal ResnetBlock, AttnBlock, temporal AttnBlock; Upsample between levels.
    """

    def __init__(self, config: MoVQConfig):
        super().__init__()
        c = config
        block = partial(ResnetBlock, dropout=c.dropout, zq_channels=c.z_channels, add_conv=c.add_conv)
        attn = partial(AttnBlock, zq_channels=c.z_channels, add_conv=c.add_conv)
        temporal_mix = (c.temporal_kernel_size, c.temporal_conv_padding) if c.temporal else None
        block_in = c.ch * c.ch_mult[-1]
        resolution = c.resolution // 2 ** (len(c.ch_mult) - 1)

        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        mid_mix = temporal_mix if c.temporal_mid_blocks else None
        # Official quirk: only mid.block_1 is built with flicker_augmentation; no other block gets the flag.
        self.mid.block_1 = block(
            block_in, block_in, temporal_mix=mid_mix, flicker_augmentation=c.flicker_augmentation
        )
        self.mid.attn_1 = attn(block_in)
        self.mid.temporal_attn_1 = attn(block_in, temporal=True) if c.temporal_attention_block else Identity()
        self.mid.block_2 = block(block_in, block_in, temporal_mix=mid_mix)
        self.mid.temporal_block_1 = block(block_in, block_in, across_frames=True) if c.temporal_blocks else Identity()
        self.mid.temporal_block_2 = block(block_in, block_in, across_frames=True) if c.temporal_blocks else Identity()

        self.up = nn.ModuleList()
        for i_level in reversed(range(len(c.ch_mult))):
            level = nn.Module()
            level.block, level.attn, level.temporal_attn, level.temporal_block = (nn.ModuleList() for _ in range(4))
            block_out = c.ch * c.ch_mult[i_level]
            for _ in range(c.num_res_blocks + 1):
                level.block.append(block(block_in, block_out, temporal_mix=temporal_mix))
                block_in = block_out
                if c.temporal_blocks:
                    level.temporal_block.append(block(block_in, block_in, across_frames=True))
                if resolution in c.attn_resolutions:
                    level.attn.append(attn(block_in))
                    if c.temporal_attention_block:
                        level.temporal_attn.append(attn(block_in, temporal=True))
            if i_level == 0:
                level.upsample = Identity()
            else:
                level.upsample = Upsample(block_in)
                resolution *= 2
            self.up.insert(0, level)  # up[i] is level i, as in the encoder
        self.norm_out = SpatialNorm(block_in, c.z_channels, c.add_conv)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor, zq: torch.Tensor, frames: Frames, aug_emb: torch.Tensor | None = None):
        h = self.conv_in(z)
        mid = self.mid
        h = mid.block_1(h, zq, frames, aug_emb)
        h = mid.temporal_attn_1(mid.attn_1(h, zq), zq, frames)
        h = mid.temporal_block_1(h, zq, frames)
        h = mid.temporal_block_2(mid.block_2(h, zq, frames, aug_emb), zq, frames)
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h, zq, frames, aug_emb)
                if level.temporal_block:
                    h = level.temporal_block[i](h, zq, frames)
                if level.attn:
                    h = level.attn[i](h, zq)
                    if level.temporal_attn:
                        h = level.temporal_attn[i](h, zq, frames)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


class MoVQ(nn.Module):
    """`encode(x)`: b 3 H W in [-1, 1] -> b 4 H/8 W/8; `decode(z)`: back, the b latents being one clip.

    `parts` builds only the encoder (`encoder`, `quant_conv`) or only the decoder (`post_quant_conv`,
    `decoder`) side; `PARTS` names the top-level modules, hence the state-dict prefixes, of each.
    """

    PARTS = {"encoder": ("encoder", "quant_conv"), "decoder": ("post_quant_conv", "decoder")}

    def __init__(self, config: MoVQConfig, parts: Sequence[str] = ("encoder", "decoder")):
        super().__init__()
        unknown = set(parts) - set(self.PARTS)
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of {tuple(self.PARTS)}, got {tuple(parts)}")
        self.config = config
        self.parts = tuple(p for p in self.PARTS if p in parts)
        z = config.z_channels
        if "encoder" in self.parts:
            self.encoder = Encoder(config)
            self.quant_conv = nn.Conv2d(z, z, 1)
        if "decoder" in self.parts:
            self.post_quant_conv = nn.Conv2d(z, z, 1)
            self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._require("encoder")
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, aug_emb: torch.Tensor | None = None) -> torch.Tensor:
        """z: (b t) 4 h w with b = 1 (one clip of t frames); aug_emb: 1 t 1 for the flicker path."""
        self._require("decoder")
        return self.decoder(self.post_quant_conv(z), z, Frames(z.shape[0]), aug_emb)

    def _require(self, part: str) -> None:
        if part not in self.parts:
            raise RuntimeError(f"this MoVQ was built with parts={self.parts}, without its {part}")
