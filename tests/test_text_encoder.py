"""The text condition encoder: parity with the official one, the full-size layout, tokenisation, tiny behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kvray.config import KV11, TINY
from kvray.config.arch import TextEncoderConfig
from kvray.models.text_encoder import (
    PROJECTIONS,
    TextConditionEncoder,
    build_tokenizer,
    official_state_dict_to_ours,
    tokenize,
)
from kvray.sampling.loops import TextCondition

TOLERANCE = 1e-4


def _loaded(config: TextEncoderConfig, official_state: dict) -> TextConditionEncoder:
    encoder = TextConditionEncoder(config)
    encoder.load_state_dict(official_state_dict_to_ours(official_state))  # strict
    return encoder.eval()


def _assert_output(got, expected_context, expected_mask):
    context, mask = got
    assert context.shape == expected_context.shape
    assert (context - expected_context).abs().max().item() <= TOLERANCE
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected_mask.bool())


@pytest.fixture(scope="module")
def e2e_encoder(golden_e2e_dir):
    """The golden-e2e tiny encoder, from the official module's state dict (`encoder.*`, `projection.*`, ...)."""
    config = json.loads((golden_e2e_dir / "t5_encoder.config.json").read_text())
    arch = TextEncoderConfig(t5=config["t5_config"], context_dim=config["context_dim"],
                             tokens_length=config["tokens_length"])
    return _loaded(arch, load_file(golden_e2e_dir / "t5_encoder.weights.safetensors"))


# --------------------------------------------------------------------------------------------------- parity

def test_golden_calls(golden_dir):
    """`golden/text_encoder.*`: weights as a T5EncoderModel state dict (`t5.*`) + t5_projections.pt layout."""
    spec = json.loads((golden_dir / "text_encoder.json").read_text())
    encoder = _loaded(TextEncoderConfig.model_validate(spec["config"]),
                      load_file(golden_dir / "text_encoder.weights.safetensors"))
    io = load_file(golden_dir / "text_encoder.io.safetensors")
    assert spec["tolerance"] == TOLERANCE and {c["name"] for c in spec["calls"]} == set(PROJECTIONS)
    for call in spec["calls"]:
        # The io file holds the inputs once, shared by both calls.
        args = [io[a] for a in call["args"]]
        with torch.inference_mode():
            got = encoder(*args, projection=call["literals"]["model_type"])
        _assert_output(got, io[call["output"]], io[call["extra_outputs"][0]])


@pytest.mark.parametrize("case", ["single", "batch2"])
def test_golden_e2e_t5_encoder(golden_e2e_dir, e2e_encoder, case):
    io = load_file(golden_e2e_dir / "t5_encoder.io.safetensors")
    ids, mask = io[f"{case}.input_ids"], io[f"{case}.attention_mask"]
    with torch.inference_mode():
        hidden = e2e_encoder.t5(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (hidden - io[f"{case}.debug.t5_last_hidden_state"]).abs().max().item() <= TOLERANCE
        for tag, projection in (("base", "projection_base"), ("interpolation", "projection_interpolation")):
            got = e2e_encoder(ids, mask, projection)
            _assert_output(got, io[f"{case}.{tag}.context"], io[f"{case}.{tag}.context_mask"])


@pytest.mark.parametrize("run", ["t2v", "i2v"])
def test_golden_pipeline_text_calls(golden_e2e_dir, e2e_encoder, run):
    """Every `encode_text` of the official pipeline (one prompt, `projection_base` for every stage)."""
    io = load_file(golden_e2e_dir / "pipeline.io.safetensors")
    ids, mask = io[f"{run}.tokens.input_ids"][None], io[f"{run}.tokens.attention_mask"][None]
    with torch.inference_mode():
        got = e2e_encoder(ids, mask)
    for call in range(3):
        _assert_output(got, io[f"{run}.text.call{call}.context"], io[f"{run}.text.call{call}.context_mask"])


def test_unconditional_context_matches_official_sampling(golden_e2e_dir):
    """The unconditional halves of the U-Net batches the official sampling loops built, per U-Net."""
    io = load_file(golden_e2e_dir / "e2e.io.safetensors")
    context, mask = io["inputs.context_1"], io["inputs.context_mask_1"]
    for run, unet, repeats in (("image", "keyframe_unet", 1), ("keyframe", "keyframe_unet", 4),
                               ("interpolation", "interp_unet", 3)):
        null = load_file(golden_e2e_dir / f"{unet}.weights.safetensors")["null_embedding"]
        uncond = TextCondition(context[0], mask[0]).unconditional(null)
        large, large_mask = io[f"{run}.large_context"], io[f"{run}.large_context_mask"]
        assert torch.equal(large[repeats:2 * repeats], uncond.context.expand(repeats, -1, -1))
        assert torch.equal(large_mask[repeats:2 * repeats], uncond.mask.bool().expand(repeats, -1))


# --------------------------------------------------------------------------------------------------- layout

def test_full_size_layout_on_meta(manifests_dir):
    with torch.device("meta"):
        encoder = TextConditionEncoder(KV11.text_encoder)
    state = encoder.state_dict()
    assert all(v.is_meta for v in state.values())
    ours = {k: tuple(v.shape) for k, v in state.items()}
    for manifest, prefix, params in (("flan_ul2_t5_encoder.json", "t5.", 8_721_797_632),
                                      ("kv11_t5_projections.json", "projections.", 33_570_816)):
        expected = {k: tuple(v) for k, v in json.loads((manifests_dir / manifest).read_text())["state_dict"].items()}
        part = {k.removeprefix(prefix): s for k, s in ours.items() if k.startswith(prefix)}
        assert part == expected, manifest
        assert sum(torch.Size(s).numel() for s in part.values()) == params
    assert all(k.startswith(("t5.", "projections.")) for k in ours)


def test_official_layouts_map_to_ours():
    encoder = TextConditionEncoder(TINY.text_encoder)
    ours = encoder.state_dict()
    stack = {k.removeprefix("t5."): v for k, v in ours.items() if k.startswith("t5.")}
    projections = {}
    for k, v in ours.items():
        if k.startswith("projections."):
            label, rest = k.removeprefix("projections.").split(".", 1)
            projections.setdefault(label, {})[rest] = v

    def expect(mapped):
        assert mapped.keys() == ours.keys()
        assert all(mapped[k] is ours[k] for k in ours)  # passed through, not copied

    # Our own layout.
    expect(official_state_dict_to_ours(ours))
    # A whole transformers encoder-decoder checkpoint (as Flan-UL2's) + the nested t5_projections.pt.
    hub = {"shared.weight": stack["embed_tokens.weight"], "lm_head.weight": torch.zeros(1),
           "decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(1),
           **{f"encoder.{k}": v for k, v in stack.items() if k != "embed_tokens.weight"}}
    expect(official_state_dict_to_ours({**hub, **projections}))
    # The official module: `encoder.*` (embedding included), `projection.*`, `projection_interpolation.*`.
    module = {**{f"encoder.{k}": v for k, v in stack.items()},
              **{f"projection.{k}": v for k, v in projections["projection_base"].items()},
              **{f"projection_interpolation.{k}": v for k, v in projections["projection_interpolation"].items()}}
    expect(official_state_dict_to_ours(module))
    # Both halves of the tie: `shared.weight` wins, whatever the order.
    stale = torch.zeros_like(stack["embed_tokens.weight"])
    for tied in ({"encoder.embed_tokens.weight": stale, **hub}, {**hub, "encoder.embed_tokens.weight": stale}):
        assert official_state_dict_to_ours(tied)["t5.embed_tokens.weight"] is stack["embed_tokens.weight"]
    with pytest.raises(KeyError, match="not a key"):
        official_state_dict_to_ours({"null_embedding": torch.zeros(1)})
    with pytest.raises(KeyError, match="both map"):
        official_state_dict_to_ours({"projection.0.weight": torch.zeros(1),
                                     "projection_base.0.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------- tiny

def _tiny(seed: int = 0) -> TextConditionEncoder:
    torch.manual_seed(seed)
    return TextConditionEncoder(TINY.text_encoder).eval()


def test_tiny_shapes_cut_and_determinism():
    config = TINY.text_encoder
    tokens = tokenize(build_tokenizer(TINY.tokenizer), ["a red fox", "a"], config.tokens_length)
    lengths = tokens.attention_mask.sum(-1)
    assert lengths.tolist() == [10, 2]  # ByT5: one id per byte, + EOS
    encoder = _tiny()
    with torch.inference_mode():
        context, mask = encoder(tokens.input_ids, tokens.attention_mask)
        assert context.shape == (2, 11, config.context_dim) and mask.shape == (2, 11) and mask.dtype == torch.bool
        assert torch.equal(mask, tokens.attention_mask[:, :11].bool())
        assert torch.all(context[~mask] == 0) and torch.all(context[mask].abs().sum(-1) > 0)
        # Deterministic, and the same weights from the same seed.
        assert torch.equal(context, encoder(tokens.input_ids, tokens.attention_mask)[0])
        assert torch.equal(context, _tiny()(tokens.input_ids, tokens.attention_mask)[0])
        # A prompt's context does not depend on the batch: alone, it is the same rows, cut shorter.
        alone, alone_mask = encoder(tokens.input_ids[1:], tokens.attention_mask[1:])
        assert alone.shape == (1, 3, config.context_dim)
        torch.testing.assert_close(alone, context[1:, :3], rtol=0, atol=1e-6)
        assert torch.equal(alone_mask, mask[1:, :3])
        # The cut length given from the host tokens (no read-back of the mask) is the same cut.
        given = encoder(tokens.input_ids, tokens.attention_mask, length=int(lengths.max()) + 1)
        assert torch.equal(given[0], context) and torch.equal(given[1], mask)
        # The other projection differs; an unknown one is refused.
        other = encoder(tokens.input_ids, tokens.attention_mask, "projection_interpolation")[0]
        assert not torch.allclose(other, context)
        with pytest.raises(ValueError, match="unknown projection"):
            encoder(tokens.input_ids, tokens.attention_mask, "projection")


def test_tiny_full_prompt_keeps_every_position():
    """A prompt that fills tokens_length: the cut (L + 1) cannot go past the padded length."""
    config = TINY.text_encoder
    tokens = tokenize(build_tokenizer(TINY.tokenizer), "x" * 200, config.tokens_length)
    with torch.inference_mode():
        context, mask = _tiny()(tokens.input_ids, tokens.attention_mask)
    assert context.shape == (1, config.tokens_length, config.context_dim) and bool(mask.all())


def test_tokenize_pads_truncates_and_flags():
    tokenizer = build_tokenizer(TINY.tokenizer)
    assert len(tokenizer) == TINY.text_encoder.t5.vocab_size
    n = 8
    tokens = tokenize(tokenizer, ["hello", "a" * 7, "a" * 8, "a" * 20, ""], n)
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (5, n)
    assert tokens.input_ids.dtype == tokens.attention_mask.dtype == torch.int64
    # 7 bytes + EOS fit exactly; 8 and 20 bytes are cut to 7 bytes + EOS.
    assert tokens.truncated == (False, False, True, True, False)
    assert tokens.attention_mask.sum(-1).tolist() == [6, 8, 8, 8, 1]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for ids, mask in zip(tokens.input_ids, tokens.attention_mask):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        assert ids[length - 1] == eos and torch.all(ids[length:] == pad)
    assert torch.equal(tokens.input_ids[2], tokens.input_ids[3])
    single = tokenize(tokenizer, "hello", n)
    assert torch.equal(single.input_ids, tokens.input_ids[:1]) and single.truncated == (False,)


def test_unconditional_context_layout():
    context = torch.randn(5, 16)
    for mask in (torch.ones(5, dtype=torch.bool), torch.ones(5, dtype=torch.int64)):
        for null in (torch.randn(16), torch.randn(1, 16)):
            uncond = TextCondition(context, mask).unconditional(null.reshape(-1))
            assert uncond.context.shape == context.shape and uncond.mask.dtype == mask.dtype
            assert torch.equal(uncond.context[0], null.reshape(16))
            assert torch.all(uncond.context[1:] == 0)
            assert uncond.mask.tolist() == [1, 0, 0, 0, 0]
