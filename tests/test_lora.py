"""LoRA adapters: trained on the toy model with only the adapter changing, saved with a digest, merged into
a stage's network at their scale, named in video ids, refused where they do not fit."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kvray.config.models import LoraSpec, ModelSource
from kvray.config.presets import get_preset
from kvray.weights.adapters import ADAPTER_INFO, PEFT_WEIGHTS, AdapterError, resolve_adapters
from kvray.weights.loader import random_network
from kvray.weights.lora import add_lora, lora_config, lora_tensors, save_adapter
from kvray.weights.stage_models import load_model

NETWORK = "keyframe_unet"


def _adapter(path, preset="tiny", convs=True, seed=0) -> dict[str, torch.Tensor]:
    """A random adapter on the seeded random keyframe U-Net of `preset` (its B matrices not zero, so that
    it changes the network); returns its tensors."""
    unet = random_network(NETWORK, getattr(get_preset(preset), NETWORK), seed=1)
    config = lora_config(unet, rank=4, convs=convs)
    add_lora(unet, config)
    tensors = lora_tensors(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in tensors.values():
            value.copy_(torch.randn(value.shape, generator=generator) * 0.05)
    save_adapter(str(path), tensors, config, NETWORK, preset)
    return {k: v.clone() for k, v in tensors.items()}


def _with(models: ModelSource, *loras: str) -> ModelSource:
    """`models` with `loras` (as `--lora` gives them), resolved as a job's are."""
    return resolve_adapters(ModelSource.model_validate({**models.model_dump(), "loras": loras}))


def test_a_lora_is_written_as_path_and_scale():
    assert LoraSpec.model_validate("s3://bucket/adapters/star:0.5") == LoraSpec(path="s3://bucket/adapters/star", scale=0.5)
    assert LoraSpec.model_validate("s3://bucket/adapters/star").scale == 1.0
    assert LoraSpec.model_validate("owner/repo:2").path == "owner/repo"
    with pytest.raises(ValueError, match="not resolved"):
        _ = ModelSource(preset="tiny", loras=["dir"]).version
    # A job file's `models: {loras: [...]}` takes either form.
    from kvray.config.job import RenderJob

    job = RenderJob.model_validate({"manifest": "m", "out": "o", "models": {"loras": ["a:0.5", {"path": "b"}]}})
    assert job.models.loras == (LoraSpec(path="a", scale=0.5), LoraSpec(path="b"))


def test_a_merged_adapter_adds_scale_times_its_low_rank_product(tmp_path):
    """Merged at scale s, each adapted layer's weight is W + s * (alpha / r) * B A; every other tensor is the
    base's, and the network is a plain module again (the base's tensor names)."""
    tensors = _adapter(tmp_path / "a")
    base = ModelSource(preset="tiny", weights="random", random_seed=3)
    plain = load_model(base, NETWORK)
    merged = load_model(_with(base, f"{tmp_path / 'a'}:0.5"), NETWORK)
    assert list(merged.state_dict()) == list(plain.state_dict())

    adapted = {k.rsplit(".lora_", 1)[0] for k in tensors}
    assert any("attention.to_query" in name for name in adapted) and any("projection" in name for name in adapted)
    for name, weight in plain.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        if layer in adapted and name.endswith(".weight"):
            a, b = tensors[f"{layer}.lora_A.weight"].flatten(1), tensors[f"{layer}.lora_B.weight"].flatten(1)
            expected = weight + 0.5 * (b @ a).reshape(weight.shape)  # alpha = rank: alpha / r = 1
            torch.testing.assert_close(merged.state_dict()[name], expected)
        else:
            assert torch.equal(merged.state_dict()[name], weight), name

    # Resolved, the adapter names its network: a stage of other networks reads none of its files.
    resolved = _with(base, str(tmp_path / "a"))
    assert resolved.loras[0].network == NETWORK
    shutil.rmtree(tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(load_model(resolved, "image_movq").state_dict().values(),
                                                  load_model(base, "image_movq").state_dict().values()))


def test_video_ids_name_each_adapter_and_its_scale(tmp_path):
    """The adapter's digest covers its tensors and config, not its files' bytes: the same tensors saved
    again name the same videos; other tensors or another scale, other videos."""
    _adapter(tmp_path / "a")
    _adapter(tmp_path / "same")
    _adapter(tmp_path / "other", seed=1)
    base = ModelSource(preset="tiny", weights="random")
    version = lambda *loras: _with(base, *loras).version
    assert version() == base.version == "kandinsky-video-1.1/tiny/random-0"
    with_a = version(str(tmp_path / "a"))
    assert with_a.startswith(base.version + "+lora-") and with_a.endswith("x1")
    assert version(str(tmp_path / "same")) == with_a
    assert len({with_a, version(f"{tmp_path / 'a'}:0.5"), version(str(tmp_path / "other"))}) == 3


def test_an_adapter_that_does_not_fit_is_one_clear_error(tmp_path):
    _adapter(tmp_path / "a")
    with pytest.raises(AdapterError, match="trained for preset 'tiny', not 'toy'"):
        _with(ModelSource(preset="toy"), str(tmp_path / "a"))
    with pytest.raises(AdapterError, match="not a kvray LoRA adapter"):
        _with(ModelSource(preset="tiny"), str(tmp_path))
    # Files replaced after the job was checked: refused where the adapter is merged, not rendered under the old name.
    resolved = _with(ModelSource(preset="tiny", weights="random"), str(tmp_path / "a"))
    _adapter(tmp_path / "b", seed=5)
    (tmp_path / "a" / PEFT_WEIGHTS).write_bytes((tmp_path / "b" / PEFT_WEIGHTS).read_bytes())
    with pytest.raises(AdapterError, match="do not match the digest"):
        load_model(resolved, NETWORK)
    info = json.loads((tmp_path / "b" / ADAPTER_INFO).read_text())
    (tmp_path / "b" / ADAPTER_INFO).write_text(json.dumps({**info, "digest": "0" * 16}))
    with pytest.raises(AdapterError, match="changed since the job was checked"):
        load_model(resolved.model_copy(update={"loras": (resolved.loras[0].model_copy(update={"path": str(tmp_path / "b")}),)}),
                   NETWORK)


def test_train_lora_changes_only_the_adapter_and_resumes(tmp_path):
    """A few steps of `kvray train lora` on the shipped toy weights: the adapter is written with its concept
    and is a few percent of the U-Net; merged at scale 0 it gives the base weights exactly; a resumed run
    continues from its checkpoint."""
    from kvray.config.models import shipped_toy_weights
    from kvray.training import TrainConfig, train

    settings = dict(step="lora", work=str(tmp_path), concept="star", base=shipped_toy_weights()[0], batch_size=1,
                    size=32, warmup=1, lr=1e-3, log_every=1, validate_every=100, lora_rank=4)
    train(TrainConfig(steps=2, **settings))
    summary = train(TrainConfig(steps=3, **settings))
    with open(tmp_path / "lora" / "loss.csv") as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["1", "2", "3"]
    info = json.loads((tmp_path / "adapter" / ADAPTER_INFO).read_text())
    assert (info["network"], info["preset"], info["concept"], info["rank"]) == (NETWORK, "toy", "star", 4)
    assert info["parameters"] < 0.05 * info["base_parameters"]

    shipped = ModelSource(preset="toy")
    at_zero = _with(shipped, f"{summary['adapter']}:0")
    base, merged = load_model(shipped, NETWORK).state_dict(), load_model(at_zero, NETWORK).state_dict()
    assert all(torch.equal(base[k], merged[k]) for k in base)
    with pytest.raises(ValueError, match="unknown concept 'hexagon'"):
        train(TrainConfig(steps=3, **{**settings, "concept": "hexagon"}))


@pytest.mark.slow
def test_a_manifest_rendered_with_and_without_an_adapter_keeps_both(ray_cluster, tmp_path):
    """One output prefix, the same manifest, with and without `--lora`: two videos per row (the adapter's
    are other videos), each run renders its own, and a second run with the adapter has nothing to do."""
    from kvray.config.job import RenderJob
    from kvray.distributed.render import render

    _adapter(tmp_path / "adapter")
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red circle", "a blue square"], "steps": [2, 2],
                             "fps": ["low", "low"]}), tmp_path / "m.parquet")
    plain = RenderJob(manifest=str(tmp_path / "m.parquet"), out=str(tmp_path / "out"),
                      models={"preset": "tiny", "weights": "random"})
    adapted = plain.model_copy(update={"models": _with(plain.models, str(tmp_path / "adapter"))})
    assert render(plain).ok == 2
    assert render(adapted).ok == 2
    again = render(adapted)
    assert again.ok == 0 and again.skipped == 2
    videos = list((tmp_path / "out" / "videos").rglob("*.mp4"))
    assert len(videos) == 4
    metadata = [json.loads(p.read_text()) for p in (tmp_path / "out" / "meta").rglob("*.json")]
    assert sorted("+lora-" in m["model_version"] for m in metadata) == [False, False, True, True]
