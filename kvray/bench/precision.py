"""`kvray bench precision`: how far the text encoder's contexts move in bf16, fp16 and int8 from fp32.

The official encoder runs in fp32 (35 GB for Flan-UL2); bf16 halves that, weight-only int8 quarters
it. Compared here against fp32: the contexts the U-Nets attend to, on the tiny preset's encoder
(random weights) for a few prompts, and on the recorded calls of the official encoder in a golden
directory (`text_encoder.*`: official output in fp32). Per precision: the largest absolute
difference, the relative RMS difference (|a - b| / |a|) and the smallest cosine similarity between
a prompt's context rows, over real (unpadded) positions. Random small weights say how much each
format rounds, not how a trained 8.7B encoder behaves; no trained weights are available here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

TEXT_DTYPES = ("float32", "bfloat16", "float16", "int8")
PROMPTS = ("a red car drifting on a mountain road", "waves on a beach at dawn, slow motion",
           "a city at night", "an astronaut riding a horse through a field of sunflowers, cinematic lighting")


@dataclass(frozen=True)
class ContextDifference:
    source: str
    dtype: str
    max_abs: float
    relative_rms: float
    min_cosine: float

    def line(self) -> str:
        return (f"{self.source:<34} {self.dtype:<9} max |diff| {self.max_abs:9.3g}  relative RMS {self.relative_rms:9.3g}"
                f"  min cosine {self.min_cosine:.6f}")


def compare(source: str, dtype: str, got, reference, mask) -> ContextDifference:
    """Contexts (B, L, D) against the fp32 reference, over positions where `mask` (B, L) is set."""
    import torch

    keep = mask.bool()
    a, b = reference.double()[keep], got.double()[keep]  # (positions, D)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return ContextDifference(source, dtype, (a - b).abs().max().item(), ((a - b).norm() / a.norm()).item(),
                             cosine.min().item())


def _converted(module, dtype: str):
    """A copy of an fp32 encoder in `dtype` (int8: weight-only, bfloat16 elsewhere)."""
    import copy

    import torch

    from ..weights.quantize import int8_weight_only

    clone = copy.deepcopy(module)
    if dtype == "int8":
        return int8_weight_only(clone.to(torch.bfloat16))
    return clone.to(getattr(torch, dtype))


def tiny_differences(dtypes=TEXT_DTYPES) -> list[ContextDifference]:
    """The tiny preset's encoder (random weights, as `kvray generate --preset tiny` builds it)."""
    import torch

    from ..config import get_preset
    from ..config.models import ModelSource
    from ..models.text_encoder import build_tokenizer, tokenize
    from ..weights.stage_models import load_model

    preset = get_preset("tiny")
    encoder = load_model(ModelSource(preset="tiny"), "text_encoder", "cpu", torch.float32)
    tokens = tokenize(build_tokenizer(preset.tokenizer), list(PROMPTS), preset.text_encoder.tokens_length)
    with torch.inference_mode():
        reference, mask = encoder(tokens.input_ids, tokens.attention_mask)
        return [compare("tiny preset (random weights)", d, _converted(encoder, d)(tokens.input_ids, tokens.attention_mask)[0],
                        reference, mask) for d in dtypes]


def golden_differences(golden_dir: str | Path, dtypes=TEXT_DTYPES) -> list[ContextDifference]:
    """The official encoder's recorded calls (`text_encoder.*`): our fp32 and the other dtypes against
    the official fp32 output."""
    import json

    import torch
    from safetensors.torch import load_file

    from ..network_parity import build_golden_network

    golden_dir = Path(golden_dir)
    spec = json.loads((golden_dir / "text_encoder.json").read_text())
    encoder = build_golden_network("text_encoder", spec["config"], golden_dir / "text_encoder.weights.safetensors")
    io = load_file(golden_dir / "text_encoder.io.safetensors")
    out = []
    with torch.inference_mode():
        for call in spec["calls"]:
            name = call["name"]
            reference, mask = io[call["output"]], io[call["extra_outputs"][0]]
            for dtype in dtypes:
                network = encoder if dtype == "float32" else _converted(encoder, dtype)
                got, _ = network(io["input_ids"], io["attention_mask"], projection=call["literals"]["model_type"])
                out.append(compare(f"golden {name}", dtype, got, reference, mask))
    return out


def add_precision_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "precision", help="text encoder contexts in bf16, fp16 and weight-only int8 against fp32",
        description="Encodes prompts with the tiny preset's encoder, and replays the official encoder's golden "
                    "calls, in each precision, and prints how far the contexts are from fp32.")
    p.add_argument("--golden", help="a golden directory with text_encoder.* (e.g. ../shared/golden)")
    p.set_defaults(run=run_precision_command)
    return p


def run_precision_command(args) -> int:
    rows = tiny_differences()
    if args.golden:
        if not (Path(args.golden) / "text_encoder.json").is_file():
            print(f"error: {args.golden} has no text_encoder.json", file=sys.stderr)
            return 2
        rows += golden_differences(args.golden)
    for row in rows:
        print(row.line())
    return 0
