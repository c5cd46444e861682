"""The MoVQs: parity with the official networks, the full-size layouts, and tiny-scale behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from kvray.config import KV11, TINY
from kvray.models.movq import MoVQ
from kvray.network_parity import check_file, max_abs_diff

from .golden_e2e import TOLERANCE, assert_case, debug_paths, load_case_file, record_outputs


@pytest.mark.parametrize("name", ["image_movq", "video_movq"])
def test_golden_calls(golden_dir, name):
    results = list(check_file(golden_dir / f"{name}.json"))
    assert results and all(r.ok for r in results), [r.line() for r in results]


@pytest.mark.parametrize(
    "name, network, cases",
    [
        ("movq_image", "image_movq", ["encode", "decode", "decode_b2"]),
        ("movq_video", "video_movq", ["encode_t4", "decode_t4", "decode_t3"]),
        ("movq_video_allflags", "video_movq", ["encode_t4", "decode_t4", "decode_t3", "decode_t4_aug"]),
    ],
)
def test_golden_e2e_calls(golden_e2e_dir, name, network, cases):
    module, config, io = load_case_file(golden_e2e_dir, name, network)
    assert set(config["calls"]) == set(cases)
    for case in cases:
        # Inputs are `<case>.<argument>`, named as our (and the official) method arguments.
        inputs = {k.removeprefix(f"{case}."): v for k, v in io.items()
                  if k.startswith(f"{case}.") and k != f"{case}.out" and ".debug." not in k}
        paths = debug_paths(io, case)
        with record_outputs(module, paths) as captured, torch.inference_mode():
            out = getattr(module, case.split("_")[0])(**inputs)
        assert set(captured) == set(paths)
        assert_case(module, io, case, out, captured)
        # Every sub-module output too, not only the final one; `captured` is in forward order.
        diffs = {path: max_abs_diff(value, io[f"{case}.debug.{path}"]) for path, value in captured.items()}
        first = next((path for path, diff in diffs.items() if diff > TOLERANCE), None)
        assert first is None, f"{name} {case}: first divergence at {first} ({diffs[first]:.2e})"


@pytest.mark.parametrize(
    "config, parts, manifest, params",
    [
        (KV11.image_movq, ("encoder", "decoder"), "kv11_image_movq.json", 270_603_567),
        (KV11.video_movq, ("encoder", "decoder"), "kv11_video_movq_full.json", 666_131_275),
        (KV11.video_movq, ("decoder",), "kv11_video_movq_decoder_only.json", 556_645_939),
    ],
)
def test_full_size_layout(manifests_dir, config, parts, manifest, params):
    with torch.device("meta"):
        movq = MoVQ(config, parts=parts)
    ours = {k: tuple(v.shape) for k, v in movq.state_dict().items()}
    expected = {k: tuple(v) for k, v in json.loads((manifests_dir / manifest).read_text())["state_dict"].items()}
    assert ours == expected
    assert sum(p.numel() for p in movq.parameters()) == params


def test_parts_split_the_state_dict():
    full = MoVQ(TINY.video_movq)
    for part, modules in MoVQ.PARTS.items():
        alone = MoVQ(TINY.video_movq, parts=(part,))
        expected = {k for k in full.state_dict() if k.split(".")[0] in modules}
        assert set(alone.state_dict()) == expected
    with pytest.raises(ValueError):
        MoVQ(TINY.video_movq, parts=("vae",))


def _random(config, seed=0, parts=("encoder", "decoder")) -> MoVQ:
    """Fresh weights with every temporal gate open (they start at zero) so all paths count."""
    torch.manual_seed(seed)
    movq = MoVQ(config, parts=parts).eval()
    with torch.no_grad():
        for name, param in movq.named_parameters():
            if "temporal_merge" in name:
                param.uniform_(0.2, 0.5)
            elif "temporal_projection" in name:
                param.normal_(0, 0.02)
    return movq


@torch.inference_mode()
def test_tiny_image_shapes_and_determinism():
    movq = _random(TINY.image_movq)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = movq.encode(x)
    assert z.shape == (2, 4, 4, 6)
    image = movq.decode(z)
    assert image.shape == (2, 3, 32, 48)
    assert torch.equal(image, _random(TINY.image_movq).decode(z))
    # Official quirk: the attention norms of every sample use zq of the first one.
    assert not torch.allclose(image[1:], movq.decode(z[1:]))


@torch.inference_mode()
def test_tiny_video_decode_shapes_determinism_and_parts():
    movq = _random(TINY.video_movq, seed=1)
    z = torch.randn(5, 4, 4, 6)
    video = movq.decode(z)
    assert video.shape == (5, 3, 32, 48)
    assert torch.equal(video, movq.decode(z))
    decoder_only = MoVQ(TINY.video_movq, parts=("decoder",)).eval()
    decoder_keys = set(decoder_only.state_dict())
    decoder_only.load_state_dict({k: v for k, v in movq.state_dict().items() if k in decoder_keys})
    assert torch.equal(decoder_only.decode(z), video)
    with pytest.raises(RuntimeError, match="without its encoder"):
        decoder_only.encode(torch.zeros(1, 3, 32, 48))
    # The frames of a clip mix: changing the last frame changes the decoded first frame.
    changed = z.clone()
    changed[-1] += 1
    assert not torch.allclose(movq.decode(changed)[0], video[0])
