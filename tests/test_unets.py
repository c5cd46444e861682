"""The two U-Net3Ds: parity with the official networks, the full-size layouts, and tiny-scale behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from kvray.config import KV11, TINY
from kvray.models.interpolator import InterpolationUNet
from kvray.models.unet3d import KeyframeUNet
from kvray.network_parity import check_file
from kvray.weights import random_network
from kvray.weights.checkpoint import build_on_meta, shapes

from .golden_e2e import load_case_file, replay


@pytest.mark.parametrize("name", ["keyframe_unet", "interpolation_unet"])
def test_golden_calls(golden_dir, name):
    results = list(check_file(golden_dir / f"{name}.json"))
    assert results and all(r.ok for r in results), [r.line() for r in results]


@pytest.mark.parametrize(
    "name, network, cases",
    [
        ("keyframe_unet", "keyframe_unet", ["image_mode", "video_mode"]),
        ("interp_unet", "interpolation_unet", ["medium", "high_custom"]),
        ("interp_unet_allflags", "interpolation_unet", ["medium", "high_custom"]),
    ],
)
def test_golden_e2e_calls(golden_e2e_dir, name, network, cases):
    module, config, io = load_case_file(golden_e2e_dir, name, network)
    assert set(config["calls"]) == set(cases)
    for case in cases:
        replay(module, config, io, case)


@pytest.mark.parametrize(
    "factory, config, manifest, params",
    [
        (KeyframeUNet, KV11.keyframe_unet, "kv11_t2v_unet3d.json", 4_149_077_956),
        (InterpolationUNet, KV11.interpolation_unet, "kv11_interpolation_unet3d.json", 3_979_941_530),
    ],
)
def test_full_size_layout(manifests_dir, factory, config, manifest, params):
    ours = shapes(build_on_meta(lambda: factory(config)).state_dict())
    expected = {k: tuple(v) for k, v in json.loads((manifests_dir / manifest).read_text())["state_dict"].items()}
    assert ours == expected
    assert sum(torch.Size(s).numel() for s in ours.values()) == params


def _keyframe_inputs(batch, frames=None, size=(16, 24)):
    cfg = TINY.keyframe_unet
    context = torch.randn(batch, 5, cfg.context_dim)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    x = torch.randn(batch, cfg.num_channels, *size)
    return x, torch.full((batch,), 500.0), context, mask


def test_keyframe_modes_shapes_and_determinism():
    unet = random_network("keyframe_unet", TINY.keyframe_unet, seed=1)
    x, t, ctx, mask = _keyframe_inputs(2)
    image = unet(x, t, ctx, mask)
    assert image.shape == (2, 4, 16, 24)
    frames = 4
    xv, tv, ctxv, maskv = _keyframe_inputs(3 * frames)
    video_args = (torch.arange(frames).repeat(3).float(), frames, torch.full((3 * frames,), 20), torch.full((3 * frames,), 10))
    video = unet(xv, tv, ctxv, maskv, *video_args)
    assert video.shape == (3 * frames, 4, 16, 24)
    again = random_network("keyframe_unet", TINY.keyframe_unet, seed=1)(xv, tv, ctxv, maskv, *video_args)
    assert torch.equal(video, again)


def test_keyframe_video_mode_mixes_frames_image_mode_does_not():
    """Temporal layers couple the frames of a clip in video mode only; clips never see each other."""
    unet = random_network("keyframe_unet", TINY.keyframe_unet, seed=2)
    frames = 3
    x, t, ctx, mask = _keyframe_inputs(2 * frames)
    video_args = (torch.arange(frames).repeat(2).float(), frames, torch.full((2 * frames,), 20), torch.full((2 * frames,), 10))
    base = unet(x, t, ctx, mask, *video_args)
    poked = x.clone()
    poked[0] += 1.0  # frame 0 of clip 0
    moved = (unet(poked, t, ctx, mask, *video_args) - base).abs().amax(dim=(1, 2, 3))
    assert moved[1:frames].min() > 0  # the other frames of clip 0 change
    assert moved[frames:].max() == 0  # clip 1 does not
    image = unet(x, t, ctx, mask)
    assert (unet(poked, t, ctx, mask) - image)[1:].abs().max() == 0  # image mode: samples independent


def test_interpolation_groups_mix_only_where_the_mask_allows():
    unet = random_network("interpolation_unet", TINY.interpolation_unet, seed=3)
    groups = 3
    cfg = TINY.interpolation_unet
    x = torch.randn(2 * groups, cfg.num_channels, 16, 16)
    ctx, mask = torch.randn(2 * groups, 4, cfg.context_dim), torch.ones(2 * groups, 4, dtype=torch.bool)
    kwargs = dict(
        num_predicted_groups=groups,
        perturbation_time=torch.zeros(2 * groups, dtype=torch.int32),
        skip_frames=torch.full((2 * groups,), 3, dtype=torch.int32),
        temporal_mask=torch.tensor([1.0] * groups + [0.0] * groups),
    )
    t = torch.full((2 * groups,), 999)
    base = unet(x, t, ctx, mask, **kwargs)
    assert base.shape == (2 * groups, cfg.out_channels, 16, 16)
    poked = x.clone()
    poked[0] += 1.0
    poked[groups] += 1.0
    moved = (unet(poked, t, ctx, mask, **kwargs) - base).abs().amax(dim=(1, 2, 3))
    assert moved[1:groups].min() > 0  # conditional groups see their neighbours
    assert moved[groups + 1:].max() == 0  # unconditional groups stay independent (mask 0)
