"""Weights: official and converted formats, local / fsspec / hub sources, strict errors, safe unpickling."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from kvray.config import TINY
from kvray.config.models import ModelSource
from kvray.models.text_encoder import build_tokenizer, tokenize
from kvray.weights import CheckpointError, WeightsNotFound, WeightsSource, load_network, random_network, read_checkpoint
from kvray.weights.convert import convert
from kvray.weights.stage_models import load_tokenizer

from .t5_spiece import train_t5_like_spiece

UNETS = ("keyframe_unet", "interpolation_unet")
MOVQS = ("image_movq", "video_movq")


@pytest.fixture(scope="module")
def originals():
    return {name: random_network(name, getattr(TINY, name), seed=7) for name in (*UNETS, *MOVQS, "text_encoder")}


def write_official(directory, originals) -> None:
    """The tiny networks in the layout of the official hub repos (U-Nets in fp16, as published)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, file in zip(UNETS, ("t2v.pt", "interpolation.pt")):
        unet = originals[name]
        torch.save({"unet": {k: v.half() for k, v in unet.state_dict().items()},
                    "null_embedding": unet.null_embedding.half()[None]}, directory / file)
    for name, file in zip(MOVQS, ("movq.pt", "video_movq.pt")):
        torch.save(originals[name].state_dict(), directory / file)
    projections = originals["text_encoder"].projections
    torch.save({label: module.state_dict() for label, module in projections.items()}, directory / "t5_projections.pt")


def write_t5(directory, originals) -> None:
    """The T5 encoder as transformers saves a whole model: `shared.weight` + `encoder.*`."""
    directory.mkdir(parents=True, exist_ok=True)
    stack = originals["text_encoder"].t5.state_dict()
    tensors = {f"encoder.{k}": v.clone() for k, v in stack.items() if k != "embed_tokens.weight"}
    tensors["shared.weight"] = stack["embed_tokens.weight"].clone()
    save_file(tensors, directory / "model.safetensors")


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, originals):
    root = tmp_path_factory.mktemp("official")
    write_official(root / "kv", originals)
    write_t5(root / "t5", originals)
    return root


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, atol=0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=atol, rtol=0)
    if hasattr(a, "null_embedding"):
        torch.testing.assert_close(a.null_embedding.float(), b.null_embedding.float(), atol=atol, rtol=0)


def test_local_directory_load_every_network(official_dir, originals):
    source, t5 = WeightsSource(official_dir / "kv"), WeightsSource(official_dir / "t5")
    for name, original in originals.items():
        loaded = load_network(name, source, getattr(TINY, name), t5_source=t5, dtype=torch.float32)
        # U-Nets went through fp16 like the published files.
        _same_weights(loaded, original, atol=1e-2 if name in UNETS else 0.0)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_loaded_text_encoder_encodes_like_the_original(official_dir, originals):
    loaded = load_network("text_encoder", WeightsSource(official_dir / "kv"), TINY.text_encoder,
                          t5_source=WeightsSource(official_dir / "t5"))
    tokens = tokenize(build_tokenizer(TINY.tokenizer), ["a red car", "snow"], TINY.text_encoder.tokens_length)
    with torch.inference_mode():
        got = loaded(tokens.input_ids, tokens.attention_mask)
        want = originals["text_encoder"](tokens.input_ids, tokens.attention_mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fsspec_source(official_dir, tmp_path, originals):
    fs = fsspec.filesystem("memory")
    fs.put_file(str(official_dir / "kv" / "movq.pt"), "/weights/kv/movq.pt")
    source = WeightsSource("memory://weights/kv", cache_dir=tmp_path / "cache")
    loaded = load_network("image_movq", source, TINY.image_movq)
    _same_weights(loaded, originals["image_movq"])
    assert list((tmp_path / "cache").rglob("movq.pt"))  # fetched once into the cache
    with pytest.raises(WeightsNotFound, match="t2v.pt"):
        load_network("keyframe_unet", source, TINY.keyframe_unet)


def test_hub_source_offline_from_cache(official_dir, tmp_path, originals):
    """A hub repo id resolves through huggingface_hub's cache; offline mode never touches the network."""
    snapshot = tmp_path / "hub" / "models--owner--tiny-kv" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    (snapshot / "movq.pt").write_bytes((official_dir / "kv" / "movq.pt").read_bytes())
    code = (
        "import torch; from kvray.config import TINY; from kvray.weights import WeightsSource, load_network;"
        f"m = load_network('image_movq', WeightsSource('owner/tiny-kv', cache_dir={str(tmp_path)!r}), TINY.image_movq);"
        "print(sum(p.numel() for p in m.parameters()))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == sum(p.numel() for p in originals["image_movq"].parameters())


def test_convert_round_trip(official_dir, tmp_path, originals):
    written = convert(WeightsSource(official_dir / "kv"), str(tmp_path / "conv"), TINY,
                      t5_source=WeightsSource(official_dir / "t5"))
    assert len(written) == 2 * len(originals)
    arch = json.loads((tmp_path / "conv" / "keyframe_unet.json").read_text())
    assert arch["network"] == "keyframe_unet" and arch["config"]["model_channels"] == TINY.keyframe_unet.model_channels
    source = WeightsSource(tmp_path / "conv")
    for name, original in originals.items():
        # No config given: the architecture comes from the converted JSON.
        loaded = load_network(name, source)
        _same_weights(loaded, original, atol=1e-2 if name in UNETS else 0.0)
    other = TINY.keyframe_unet.model_copy(update={"model_channels": 16})
    with pytest.raises(CheckpointError, match="another architecture"):
        load_network("keyframe_unet", source, other)


def test_convert_writes_the_tokenizer_that_load_tokenizer_reads(official_dir, tmp_path):
    """A preset with a sentencepiece tokenizer: `convert` copies the T5 source's spiece.model into
    `tokenizer/`, and the converted directory alone then gives the tokenizer (no hub needed)."""
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "model.safetensors").write_bytes((official_dir / "t5" / "model.safetensors").read_bytes())
    spiece = train_t5_like_spiece(t5)
    preset = TINY.model_copy(update={"tokenizer": "owner/not-on-this-machine"})
    written = convert(WeightsSource(official_dir / "kv"), str(tmp_path / "conv"), preset,
                      t5_source=WeightsSource(t5), networks=["text_encoder"])
    assert written[-1] == f"{tmp_path / 'conv'}/tokenizer/spiece.model"
    assert (tmp_path / "conv" / "tokenizer" / "spiece.model").read_bytes() == spiece.read_bytes()
    expected = build_tokenizer(str(spiece)).encode("a red fox <extra_id_0>")
    for models in (ModelSource(preset="kv11", weights=str(tmp_path / "conv")),  # converted weights
                   ModelSource(preset="kv11", weights="random", t5=str(t5))):  # the T5 source
        assert load_tokenizer(models).encode("a red fox <extra_id_0>") == expected


def test_broken_checkpoint_names_every_bad_key(tmp_path, originals):
    state = dict(originals["image_movq"].state_dict())
    state.pop("decoder.conv_out.bias")
    state["decoder.extra.weight"] = torch.zeros(1)
    state["encoder.conv_in.weight"] = torch.zeros(1, 2, 3)
    torch.save(state, tmp_path / "movq.pt")
    with pytest.raises(CheckpointError) as err:
        load_network("image_movq", WeightsSource(tmp_path), TINY.image_movq)
    message = str(err.value)
    assert "1 missing: decoder.conv_out.bias" in message
    assert "1 unexpected: decoder.extra.weight" in message
    assert "encoder.conv_in.weight (expected (32, 3, 3, 3), got (1, 2, 3))" in message


def test_missing_null_embedding_and_wrong_container(tmp_path, originals):
    torch.save({"unet": originals["keyframe_unet"].state_dict()}, tmp_path / "t2v.pt")
    with pytest.raises(CheckpointError, match="null_embedding"):
        load_network("keyframe_unet", WeightsSource(tmp_path), TINY.keyframe_unet)
    with pytest.raises(CheckpointError, match="movq.pt"):
        (tmp_path / "movq.pt").write_bytes(b"not a checkpoint")
        load_network("image_movq", WeightsSource(tmp_path), TINY.image_movq)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "movq.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": _RunsCode(marker)}, f)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    torch.save({"weight": _RunsCode(marker)}, path)  # the zip format too
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


def test_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(WeightsNotFound, match="not an existing directory"):
        WeightsSource("no such thing")
    with pytest.raises(WeightsNotFound, match="t2v.pt not found"):
        WeightsSource(tmp_path).path("t2v.pt")
