"""The training recipe of FusionFrames, one step per network, over kvray's own networks.

| step          | trains                                     | needs (frozen)              | loss                           |
|---------------|--------------------------------------------|-----------------------------|--------------------------------|
| image_movq    | image MoVQ                                 | -                           | L1 + L2 reconstruction, range  |
| first_frame   | keyframe U-Net (image mode) + text encoder | image MoVQ                  | keyframe_prediction's (*)      |
| keyframes     | keyframe U-Net (video + image mode)        | text encoder, image MoVQ    | the same, on 12 keyframes      |
| interpolation | interpolation U-Net (from keyframe U-Net)  | text encoder, image MoVQ    | interpolation_prediction's (**)|
| keyframes_motion | keyframe U-Net, continued from keyframes | text encoder, image MoVQ    | as keyframes, t drawn high     |
| video_movq    | temporal MoVQ decoder (from the image one) | image MoVQ encoder          | L1 + L2 on chunks of frames    |

(*) epsilon weighted 1/alpha_bar, capped, as kv11 is sampled; or v (the toy).
(**) v on the 3 frames between keyframes (kv11), or those frames themselves (the toy).

Each step builds what the sampler will ask of its network: the same inputs, layouts and branches
(`kvray.sampling.loops`), with the conditions dropped as the guidance branches drop them. Only the
text encoder departs from the official system: frozen there (Flan-UL2), it is trained here with the
first-frame U-Net, since no pretrained encoder is at hand at toy size; every later step freezes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ..config.presets import ModelPreset
from ..models.text_encoder import build_tokenizer, tokenize
from ..models.unet3d import TemporalAttentionBlock, TemporalResNetBlock
from ..pipeline.frames import decode_chunks
from ..weights.convert import write_converted
from ..weights.loader import load_network
from ..weights.networks import get_network
from ..weights.source import WeightsSource
from .data import ToyData, batch_seed
from .diffusion import (
    add_noise,
    alphas_cumprod,
    high_noise_timesteps,
    random_timesteps,
    unconditional_context,
    v_target,
)
from .recipe import STEP_NAMES

# Share of samples trained on each guidance branch's dropped condition (the null text; the null text and
# no first frame; the interpolation's zero neighbours).
DROP_TEXT = 0.1
DROP_ALL = 0.1
# Noise added to the latents before decoding: the U-Nets' samples are never exact latents.
DECODER_LATENT_NOISE = 0.1
# The samplers clip x0 to [-1, 1]: latents past that cannot be reached, so the MoVQ is taught to stay inside.
LATENT_LIMIT = 1.0
# Largest first-frame noise augmentation drawn in training (the official pipeline samples at 20).
MAX_NOISE_AUGMENTATION = 100


@dataclass
class Context:
    """What every step shares: the preset, the data, the device, and where finished networks are."""

    preset: ModelPreset
    data: ToyData
    weights: str  # a local folder in kvray's converted format: earlier steps' networks are read from here
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def load(self, name: str) -> nn.Module:
        """A finished network of an earlier step, frozen."""
        if not (Path(self.weights) / f"{name}.safetensors").is_file():
            raise FileNotFoundError(f"{name} is not trained yet: no {name}.safetensors in {self.weights} "
                                    f"(run its training step first: `kvray train --help`)")
        return load_network(name, WeightsSource(self.weights), getattr(self.preset, name), device=self.device,
                            dtype=torch.float32)

    def fresh(self, name: str) -> nn.Module:
        """A new network, its initial weights drawn from the run's seed (a rerun starts from the same)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(self.data.seed, f"init/{name}", 0))
            return get_network(name).build(getattr(self.preset, name)).to(self.device)


class Step:
    """One network's training: `networks` (name -> trainable module), `extras` (name -> trainable tensors
    saved beside a network, e.g. the U-Net's null embedding) and `loss(step, generator)`."""

    name: str
    batch_size: int

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.networks: dict[str, nn.Module] = {}
        self.extras: dict[str, dict[str, nn.Parameter]] = {}

    def parameters(self) -> list[nn.Parameter]:
        params = [p for n in self.networks.values() for p in n.parameters() if p.requires_grad]
        return params + [p for e in self.extras.values() for p in e.values()]

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the step writes, keyed `network/name` (sharing the live storage): full state dicts
        (buffers too) and extras. What the EMA averages and a checkpoint holds."""
        out = {f"{net}/{k}": v for net, module in self.networks.items() for k, v in module.state_dict().items()}
        out.update({f"{net}/{k}": v for net, extras in self.extras.items() for k, v in extras.items()})
        return out

    def export(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Write the step's networks (from `tensors`, e.g. the EMA) to the context's weights folder in kvray's
        converted format, where later steps and `--weights` read them."""
        written, preset = [], self.ctx.preset
        for net in self.networks:
            state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{net}/")}
            extras = {k: state.pop(k) for k in list(state) if k in self.extras.get(net, {})}
            written += write_converted(self.ctx.weights, net, preset.name, getattr(preset, net), state, extras)
        return written

    def loss(self, step: int, generator: torch.Generator, validation: bool = False) -> torch.Tensor:
        raise NotImplementedError


LATENT_RANGE_WEIGHT = 10.0


def _latent_range_penalty(z: torch.Tensor) -> torch.Tensor:
    return LATENT_RANGE_WEIGHT * F.relu(z.abs() - LATENT_LIMIT).pow(2).mean()


# Reconstruction weights: small objects on plain backgrounds are a few percent of the pixels, and a plain
# per-pixel loss is content to blur them into blobs of the wrong hue. Pixels far from the frame's median
# colour (the object) and pixels of fine detail (edges) weigh more.
RARE_COLOUR_WEIGHT = 5.0
DETAIL_WEIGHT = 10.0


def _reconstruction(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weighted L1 + L2 of decoded `y` against `x`, both (..., 3, H, W) in [-1, 1]."""
    flat = x.reshape(-1, *x.shape[-3:])
    median = flat.flatten(2).median(dim=2).values[..., None, None]  # (N, 3, 1, 1)
    rare = (flat - median).abs().mean(1, keepdim=True)
    detail = (flat - F.avg_pool2d(flat, 3, stride=1, padding=1, count_include_pad=False)).abs().mean(1, keepdim=True)
    weight = (1 + RARE_COLOUR_WEIGHT * rare + DETAIL_WEIGHT * detail).reshape(*x.shape[:-3], 1, *x.shape[-2:])
    error = y - x
    return ((error.abs() + error.pow(2)) * weight).mean() / weight.mean()


class ImageMoVQStep(Step):
    """The image autoencoder. Each decode holds one image: the MoVQ attention modulates a whole batch
    with its first latent (an official quirk), and the pipeline decodes one image at a time."""

    name = "image_movq"
    batch_size = 8

    def __init__(self, ctx):
        super().__init__(ctx)
        self.networks = {"image_movq": ctx.fresh("image_movq")}

    def loss(self, step, generator, validation=False):
        movq = self.networks["image_movq"]
        # Every other batch at twice the size: kv11 decodes its first frame at 2x before resizing it.
        double = step % 2 == 1
        count = max(1, self.batch_size // 2) if double else self.batch_size
        clips = self.ctx.data.clips(self.name, step, count, validation)
        size = self.ctx.data.size * (2 if double else 1)
        frame = int(torch.randint(0, 12, (1,), generator=generator))
        x = self.ctx.data.frames(clips, 12, size, indices=[frame])[:, 0].to(self.ctx.device)  # (B, 3, H, W)
        z = movq.encode(x)
        noisy = z + DECODER_LATENT_NOISE * torch.randn(z.shape, generator=generator).to(z.device)
        y = torch.cat([movq.decode(latent[None]) for latent in noisy])
        return _reconstruction(y, x) + _latent_range_penalty(z)


def _encode_frames(movq: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, T, 4, h, w) with the frozen image MoVQ. The pipeline encodes one image per call
    (for bitwise batch invariance); here a batch only rounds differently, which training does not see."""
    with torch.no_grad():
        latents = movq.encode(rearrange(frames, "b t c h w -> (b t) c h w"))
    return rearrange(latents, "(b t) c h w -> b t c h w", b=frames.shape[0])


# The epsilon loss weighted by 1 / alpha_bar(t) (the weighting of a v-prediction loss, capped): an epsilon
# error e at time t is an x0 error e * sqrt((1 - a) / a), and the samplers start where a is nearly 0 (zero
# terminal SNR), so a plain epsilon loss leaves the first steps' x0 guesses, which set the layout and the
# colours, to noise until very long training. Normalised by the batch's weights, so the lr keeps its scale.
EPSILON_WEIGHT_CAP = 50.0


def epsilon_loss(acp: torch.Tensor, out: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    weight = (1 / acp[t]).clamp(max=EPSILON_WEIGHT_CAP)
    per_sample = (out.float() - noise).pow(2).flatten(1).mean(1)
    return (weight * per_sample).sum() / weight.sum()


def unet_target(prediction: str, acp: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
    """What a U-Net is trained to output for `prediction` (a sampler's "epsilon", "v_prediction" or "sample")."""
    if prediction == "epsilon":
        return noise
    return v_target(acp, x0, noise, t) if prediction == "v_prediction" else x0


class _TextStep(Step):
    """Steps whose U-Net reads the prompt: tokenises captions and encodes them as `EncodeText` does."""

    def __init__(self, ctx, text_encoder: nn.Module):
        super().__init__(ctx)
        self.text_encoder = text_encoder
        self.tokenizer = build_tokenizer(ctx.preset.tokenizer)
        self.acp = alphas_cumprod().to(ctx.device)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """context (B, L, D), mask (B, L) bool, lengths (B,): each caption's own context length."""
        length = self.ctx.preset.text_encoder.tokens_length
        tokens = tokenize(self.tokenizer, captions, length)
        lengths = (tokens.attention_mask.sum(-1) + 1).clamp(max=length)
        device = self.ctx.device
        context, mask = self.text_encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device),
                                          length=int(lengths.max()))
        return context, mask, lengths.to(device)

    def keyframe_unet_loss(self, out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                           t: torch.Tensor) -> torch.Tensor:
        """The keyframe U-Net's loss for the target it is sampled with (the preset's `keyframe_prediction`).
        A v loss needs no weighting: its x0 error is bounded at every t."""
        prediction = self.ctx.preset.keyframe_prediction
        if prediction == "epsilon":
            return epsilon_loss(self.acp, out, noise, t)
        return F.mse_loss(out.float(), unet_target(prediction, self.acp, x0, noise, t))

    def timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return random_timesteps(count, generator).to(self.ctx.device)

    def dropped(self, count: int, share: float, generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(count, generator=generator) < share).to(self.ctx.device)

    def null_embedding(self, network: str) -> torch.Tensor:
        return self.extras[network]["null_embedding"]


def _null_embedding(unet: nn.Module, seed: int) -> nn.Parameter:
    generator = torch.Generator().manual_seed(batch_seed(seed, "init/null_embedding", 0))
    return nn.Parameter(torch.randn(unet.config.context_dim, generator=generator).to(unet.null_embedding.device) * 0.02)


def first_frame_loss(step: _TextStep, unet: nn.Module, movq: nn.Module, clips, generator) -> torch.Tensor:
    """The keyframe U-Net in image mode (official `p_sample_loop_image`'s network call): first frames at
    the preset's `first_frame_scale` times the video's size, zeros in the condition and mask channels,
    prompt or null text."""
    ctx = step.ctx
    pixels = ctx.data.frames(clips, 12, ctx.preset.first_frame_scale * ctx.data.size, indices=[0]).to(ctx.device)
    x0 = _encode_frames(movq, pixels)[:, 0]  # (B, 4, s h, s w), s = first_frame_scale
    count = x0.shape[0]
    context, mask, lengths = step.encode([c.caption for c in clips])
    drop = step.dropped(count, DROP_TEXT + DROP_ALL, generator)
    context, mask = unconditional_context(context, mask, step.null_embedding("keyframe_unet"), drop)
    t = step.timesteps(count, generator)
    noise = torch.randn(x0.shape, generator=generator).to(ctx.device)
    x_in = torch.cat([add_noise(step.acp, x0, noise, t), torch.zeros(count, 5, *x0.shape[-2:], device=ctx.device)], 1)
    out = unet(x_in, t.to(torch.float32), context, mask, context_lengths=lengths)
    return step.keyframe_unet_loss(out, x0, noise, t)


class FirstFrameStep(_TextStep):
    """Text to first frame: the keyframe U-Net in image mode, with the text encoder trained beside it."""

    name = "first_frame"
    batch_size = 16

    def __init__(self, ctx):
        super().__init__(ctx, ctx.fresh("text_encoder"))
        unet = ctx.fresh("keyframe_unet")
        self.networks = {"text_encoder": self.text_encoder, "keyframe_unet": unet}
        self.extras = {"keyframe_unet": {"null_embedding": _null_embedding(unet, ctx.data.seed)}}
        self.movq = ctx.load("image_movq")

    def loss(self, step, generator, validation=False):
        clips = self.ctx.data.clips(self.name, step, self.batch_size, validation)
        return first_frame_loss(self, self.networks["keyframe_unet"], self.movq, clips, generator)


class KeyframesStep(_TextStep):
    """12 keyframes from the prompt and the first frame (official `p_sample_loop`'s network call):
    frame 0 of the condition is the first frame's latent noised with UNIFORM noise to a random level
    (fed as `noise_aug_time`), the motion score is the clip's. Branches as the 3-way guidance: prompt
    and frame, null text and frame, neither. Every third step is an image-mode batch, so the first
    frame is not forgotten."""

    name = "keyframes"
    batch_size = 4
    image_mode_every = 3

    def __init__(self, ctx):
        super().__init__(ctx, ctx.load("text_encoder").requires_grad_(False))
        unet = ctx.load("keyframe_unet").requires_grad_(True).train()
        self.start_video_mode(unet)
        self.networks = {"keyframe_unet": unet}
        null = nn.Parameter(unet.null_embedding.detach().clone())
        self.extras = {"keyframe_unet": {"null_embedding": null}}
        self.movq = ctx.load("image_movq")
        self.frames = 12

    @staticmethod
    def start_video_mode(unet: nn.Module) -> None:
        start_video_mode_as_image_mode(unet)

    def loss(self, step, generator, validation=False):
        unet = self.networks["keyframe_unet"]
        if step % self.image_mode_every == self.image_mode_every - 1:
            clips = self.ctx.data.clips("first_frame", step, 4 * self.batch_size, validation)
            return first_frame_loss(self, unet, self.movq, clips, generator)
        ctx, frames = self.ctx, self.frames
        clips = ctx.data.clips(self.name, step, self.batch_size, validation)
        x0 = _encode_frames(self.movq, ctx.data.frames(clips, frames).to(ctx.device))  # (B, F, 4, h, w)
        count = x0.shape[0]
        with torch.no_grad():
            context, mask, lengths = self.encode([c.caption for c in clips])
        branch = torch.rand(count, generator=generator)
        no_text = (branch < DROP_TEXT + DROP_ALL).to(ctx.device)
        no_frame = (branch < DROP_ALL).to(ctx.device)
        context, mask = unconditional_context(context, mask, self.null_embedding("keyframe_unet"), no_text)

        level = torch.randint(0, MAX_NOISE_AUGMENTATION + 1, (count,), generator=generator).to(ctx.device)
        uniform = torch.rand(x0[:, 0].shape, generator=generator).to(ctx.device)
        key_frame = add_noise(self.acp, x0[:, 0], uniform, level)
        condition = torch.zeros(count, frames, x0.shape[2] + 1, *x0.shape[-2:], device=ctx.device)
        condition[:, 0, :-1] = key_frame
        condition[:, 0, -1] = 1
        condition = condition * (~no_frame).to(condition.dtype)[:, None, None, None, None]

        t = self.timesteps(count, generator)
        noise = torch.randn(x0.shape, generator=generator).to(ctx.device)
        noisy = add_noise(self.acp, x0, noise, t)
        x_in = rearrange(torch.cat([noisy, condition], 2), "b f c h w -> (b f) c h w")
        per_frame = lambda values: per_sample(values, frames)
        scores = torch.tensor([c.scene.score for c in clips], device=ctx.device)
        out = unet(
            x_in, per_frame(t).to(torch.float32), per_frame(context), per_frame(mask),
            temporal_embed=repeat(torch.arange(frames, device=ctx.device), "f -> (b f)", b=count).to(torch.float32),
            num_frames=frames, noise_aug_time=per_frame(level).to(torch.int32),
            motion_score=per_frame(scores).to(torch.int32), context_lengths=per_frame(lengths),
        )
        frames_first = lambda x: rearrange(x, "b f c h w -> (b f) c h w")
        return self.keyframe_unet_loss(out, frames_first(x0), frames_first(noise), per_frame(t))


class KeyframesMotionStep(KeyframesStep):
    """The keyframes step continued from its result with the diffusion time drawn towards high noise
    (`high_noise_timesteps`). After the uniform draw of `keyframes` the U-Net's keyframes at t = 999 ignore
    the prompt's motion and barely see the first frame past frame 3 (docs/training.md); 400 steps of this
    draw opened a gap between the true and the opposite-direction caption that 4,000 uniform steps had not."""

    name = "keyframes_motion"

    @staticmethod
    def start_video_mode(unet: nn.Module) -> None:
        """Nothing: the video mode is trained already (by `keyframes`)."""

    def timesteps(self, count, generator):
        return high_noise_timesteps(count, generator).to(self.ctx.device)


def start_video_mode_as_image_mode(unet: nn.Module) -> None:
    """Video mode starts as image mode applied frame by frame: `in_layer` takes `image_in_layer`'s
    weights for the noisy latents and zeros for the first frame's condition, and every temporal block
    adds nothing yet (its last projection zeroed, as video models grown from image models start). The
    keyframes step then begins from a model that already draws the prompt in every frame and learns only
    what frames share; from random temporal layers and a random `in_layer`, 2,400 steps were not enough
    for a background that stays put. A resumed run overwrites all of it from its checkpoint."""
    latent_channels = unet.config.resolved_out_channels
    with torch.no_grad():
        unet.in_layer.weight.copy_(unet.image_in_layer.weight)
        unet.in_layer.weight[:, latent_channels:] = 0
        unet.in_layer.bias.copy_(unet.image_in_layer.bias)
        for module in unet.modules():
            if isinstance(module, TemporalResNetBlock):
                last = module.temporal_resnet_blocks[-1][-1]
                last.weight.zero_()
                last.bias.zero_()
            elif isinstance(module, TemporalAttentionBlock):
                module.temporal_attention.output_layer.weight.zero_()
                module.feed_forward[-1].weight.zero_()


def start_interpolation_from_keyframe_unet(unet: nn.Module, keyframe_unet: nn.Module) -> None:
    """The interpolation U-Net's spatial layers, time embedding and text pooling start as the trained
    keyframe U-Net's (every tensor of the same name and shape); its input and output convolutions (20
    and 12 channels) and its temporal layers start as a fresh network's, so the 3 frames of a group are
    told apart from the start (a start that fed their mean through the image mode's layers drew all 3
    alike: docs/training.md)."""
    source = keyframe_unet.state_dict()
    with torch.no_grad():
        for name, tensor in unet.state_dict().items():
            if "temporal" not in name and name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])


def per_sample(values: torch.Tensor, count: int) -> torch.Tensor:
    """Each clip's value repeated for its `count` U-Net samples (frames or groups): b ... -> (b k) ..."""
    return repeat(values, "b ... -> (b k) ...", k=count)


# Interpolation passes: (skip_frames, frames of the clip it fills); the first pass's share of batches.
INTERPOLATION_PASSES = ((3, 45), (1, 177))
FIRST_PASS_SHARE = 0.7
GROUPS = 11  # groups per training clip: one pass over 12 keyframes


class InterpolationStep(_TextStep):
    """The 3 latent frames between each pair of frames (official `p_sample_loop_interpolation`'s call):
    [left | 3 noisy frames | right] per group, 11 groups per clip mixed by the temporal layers. The first
    pass (skip_frames 3) fills the 45-frame clip from its 12 keyframes, the second (skip_frames 1) the
    177-frame clip from 12 consecutive frames of the 45. Dropped: null text, zero neighbours and the
    temporal mask off, as the unconditional branch."""

    name = "interpolation"
    batch_size = 2

    def __init__(self, ctx):
        super().__init__(ctx, ctx.load("text_encoder").requires_grad_(False))
        unet = ctx.fresh("interpolation_unet")
        keyframe_unet = ctx.load("keyframe_unet")
        start_interpolation_from_keyframe_unet(unet, keyframe_unet)
        self.networks = {"interpolation_unet": unet}
        null = nn.Parameter(keyframe_unet.null_embedding.detach().clone())
        self.extras = {"interpolation_unet": {"null_embedding": null}}
        self.movq = ctx.load("image_movq")

    def loss(self, step, generator, validation=False):
        ctx = self.ctx
        unet = self.networks["interpolation_unet"]
        clips = ctx.data.clips(self.name, step, self.batch_size, validation)
        skip, total = INTERPOLATION_PASSES[0 if float(torch.rand(1, generator=generator)) < FIRST_PASS_SHARE else 1]
        span = 4 * GROUPS  # frames of the filled clip that one training clip covers
        start = 0 if total == 45 else 4 * int(torch.randint(0, (total - 1 - span) // 4 + 1, (1,), generator=generator))
        indices = list(range(start, start + span + 1))
        video = _encode_frames(self.movq, ctx.data.frames(clips, total, indices=indices).to(ctx.device))  # (B, 45, 4, h, w)
        count = video.shape[0]
        keys = video[:, ::4]  # (B, 12, 4, h, w)
        # (B, G, 3, 4, h, w): the frames between keys g and g + 1
        between = torch.stack([video[:, 4 * g + 1: 4 * g + 4] for g in range(GROUPS)], 1)
        x0 = rearrange(between, "b g t c h w -> (b g) (t c) h w")
        with torch.no_grad():
            context, mask, lengths = self.encode([c.caption for c in clips])
        drop = self.dropped(count, DROP_TEXT, generator)
        context, mask = unconditional_context(context, mask, self.null_embedding("interpolation_unet"), drop)
        keep = repeat((~drop).to(x0.dtype), "b -> (b g)", g=GROUPS)
        left = rearrange(keys[:, :-1], "b g c h w -> (b g) c h w") * keep[:, None, None, None]
        right = rearrange(keys[:, 1:], "b g c h w -> (b g) c h w") * keep[:, None, None, None]

        t = repeat(random_timesteps(count, generator), "b -> (b g)", g=GROUPS).to(ctx.device)
        noise = torch.randn(x0.shape, generator=generator).to(ctx.device)
        x_in = torch.cat([left, add_noise(self.acp, x0, noise, t), right], 1)
        per_group = lambda values: per_sample(values, GROUPS)
        out = unet(
            x_in, t, per_group(context), per_group(mask), num_predicted_groups=GROUPS,
            perturbation_time=torch.zeros(count * GROUPS, dtype=torch.int32, device=ctx.device),
            skip_frames=torch.full((count * GROUPS,), skip, dtype=torch.int32, device=ctx.device),
            temporal_mask=keep, context_lengths=per_group(lengths),
        )
        return F.mse_loss(out, unet_target(ctx.preset.interpolation_prediction, self.acp, x0, noise, t))


class VideoMoVQStep(Step):
    """The temporal decoder, started from the image MoVQ (its temporal layers start as identities):
    chunks of consecutive frames, as the pipeline decodes them, from the frozen image encoder's latents."""

    name = "video_movq"
    batch_size = 2

    def __init__(self, ctx):
        super().__init__(ctx)
        self.encoder = ctx.load("image_movq")
        video = ctx.fresh("video_movq")
        missing, unexpected = video.load_state_dict(self.encoder.state_dict(), strict=False)
        if unexpected or any("temporal" not in key for key in missing):
            raise RuntimeError(f"the image MoVQ does not fit the video MoVQ: missing {missing}, unexpected {unexpected}")
        for name, param in video.named_parameters():
            param.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
        self.networks = {"video_movq": video}

    def loss(self, step, generator, validation=False):
        ctx = self.ctx
        movq = self.networks["video_movq"]
        clips = ctx.data.clips(self.name, step, self.batch_size, validation)
        total = 45 if step % 2 == 0 else 177
        size = max(decode_chunks(total))
        start = int(torch.randint(0, total - size + 1, (1,), generator=generator))
        pixels = ctx.data.frames(clips, total, indices=list(range(start, start + size))).to(ctx.device)
        z = _encode_frames(self.encoder, pixels)
        losses = []
        for clip_z, clip_x in zip(z, pixels):
            noisy = clip_z + DECODER_LATENT_NOISE * torch.randn(clip_z.shape, generator=generator).to(clip_z.device)
            losses.append(_reconstruction(movq.decode(noisy), clip_x))
        return torch.stack(losses).mean()


STEPS: dict[str, type[Step]] = {s.name: s for s in (ImageMoVQStep, FirstFrameStep, KeyframesStep, InterpolationStep,
                                                    KeyframesMotionStep, VideoMoVQStep)}
assert tuple(STEPS) == STEP_NAMES, "the recipe's steps and their classes, in one order"
