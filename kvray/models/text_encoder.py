"""The text condition encoder: a T5 encoder stack and the projection of its states into the U-Nets' context.

Official counterpart: `kandinsky_video.condition_encoders.T5TextConditionEncoder` (encoder and
projections) and `condition_processors.T5TextConditionProcessor` (tokenisation). Kandinsky Video 1.1
uses the Flan-UL2 encoder (`google/flan-ul2`, 8.72B parameters in fp32) with `t5_projections.pt`.

State-dict layout of `TextConditionEncoder`:

* `t5.<key>`: a transformers `T5Stack` state dict (`t5.embed_tokens.weight`, `t5.block.<n>....`,
  `t5.final_layer_norm.weight`), the keys `encoder.*` of a transformers `T5EncoderModel` with the
  `encoder.` prefix replaced by `t5.`, the token embedding included (`shared.weight` in a transformers
  checkpoint, tied to `encoder.embed_tokens.weight` there);
* `projections.<label>.{0.weight, 1.weight, 1.bias}` for label `projection_base` and
  `projection_interpolation`: `t5_projections.pt` as it is stored (`{label: {'0.weight', ...}}`),
  flattened with a `projections.` prefix.

`official_state_dict_to_ours` maps every official layout (the official module, transformers T5
checkpoints, `t5_projections.pt`) into this one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import sentencepiece
import torch
from torch import nn

from ..config.arch import TextEncoderConfig

PROJECTION_BASE = "projection_base"
PROJECTION_INTERPOLATION = "projection_interpolation"
# The official pipeline uses `projection_base` for every stage, the interpolation U-Net included
# (its IMAGE_GENERATION_LABEL); `projection_interpolation` is loaded but never used.
PROJECTIONS = (PROJECTION_BASE, PROJECTION_INTERPOLATION)


class TextConditionEncoder(nn.Module):
    """Token ids -> `(context, context_mask)` for the U-Nets' cross-attention.

    `forward` runs the T5 encoder, projects every state with `Linear(d_model, context_dim, bias=False)`
    then `LayerNorm(context_dim)`, zeroes the padded positions and cuts the sequence to the longest
    real length + 1, exactly as the official encoder does (one zeroed, masked padding slot is kept).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        # Imported here, not with the module: a process that never builds a text encoder (the decode
        # stage's actors) should not pay for importing transformers.
        import transformers

        self.config = config
        t5_config = transformers.T5Config(**config.t5.to_transformers())
        # The official code keeps `T5EncoderModel.from_pretrained(...).encoder`; building the same model
        # and keeping its `.encoder` gives the same stack (T5EncoderModel also switches the config to
        # encoder-only: no cache, not encoder-decoder). Its token embedding is tied to the dropped
        # `shared`, so the stack owns the one embedding and `t5.*` holds the whole encoder.
        # Under `with torch.device("meta")` transformers allocates nothing (its init is a no-op there).
        self.t5 = transformers.T5EncoderModel(t5_config).encoder
        d_model, context_dim = t5_config.d_model, config.context_dim
        self.projections = nn.ModuleDict({
            label: nn.Sequential(nn.Linear(d_model, context_dim, bias=False), nn.LayerNorm(context_dim))
            for label in PROJECTIONS
        })

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, projection: str = PROJECTION_BASE,
        length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids`, `attention_mask`: (B, N) from `tokenize` (right-padded, mask 1 on real tokens).

        Returns the context (B, L + 1, context_dim) with zero rows at padding and its mask (B, L + 1),
        bool, where L = the longest real length of the batch (L + 1 is capped at N). The official mask
        is the int64 attention mask; the values are the same. `length`: L + 1 when the caller knows it
        from the tokens on the host; otherwise it is read back from the mask (a wait on the device).
        """
        if projection not in self.projections:
            raise ValueError(f"unknown projection {projection!r}; known: {', '.join(self.projections)}")
        mask = attention_mask.bool()
        states = self.t5(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        context = self.projections[projection](states)
        # masked_fill, not a product with the mask: the official code assigns zeros to the padded rows.
        context = context.masked_fill(~mask.unsqueeze(-1), 0.0)
        # The official cut keeps one padding position past the longest prompt of the batch.
        if length is None:
            length = int(mask.sum(-1).max()) + 1
        return context[:, :length], mask[:, :length]


# ---------------------------------------------------------------------------------------------------
# Official weights -> our layout

_T5_STACK_KEYS = ("embed_tokens.", "block.", "final_layer_norm.")
# Keys of a whole transformers T5 checkpoint (Flan-UL2 is an encoder-decoder) that the encoder never
# uses; `T5EncoderModel.from_pretrained` skips them too.
_UNUSED_PREFIXES = ("decoder.", "lm_head.")


def _flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """`t5_projections.pt` nests one state dict per label: flatten to dotted keys."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _our_key(key: str) -> str | None:
    """Our key for one official key; None for a key the encoder does not use."""
    if key.startswith("t5."):
        rest = key.removeprefix("t5.")
        # Ours already (`t5.<T5Stack key>`), or a T5EncoderModel state dict under `t5.` (the goldens).
        if rest.startswith(_T5_STACK_KEYS):
            return key
        if rest.startswith(("encoder.", "shared.", *_UNUSED_PREFIXES)):
            return _our_key(rest)
        raise KeyError(f"not a key of any official text-encoder layout: {key!r}")
    if key.startswith("encoder."):  # T5EncoderModel / T5ForConditionalGeneration, or the official module
        return "t5." + key.removeprefix("encoder.")
    if key == "shared.weight":
        return "t5.embed_tokens.weight"
    if key.startswith(_UNUSED_PREFIXES):
        return None
    if key.startswith("projections."):
        return key
    if key.startswith("projection."):  # the official module's attribute for `projection_base`
        return f"projections.{PROJECTION_BASE}." + key.removeprefix("projection.")
    for label in PROJECTIONS:  # t5_projections.pt, and the official module's `projection_interpolation`
        if key.startswith(label + "."):
            return f"projections.{key}"
    raise KeyError(f"not a key of any official text-encoder layout: {key!r}")


def _bare(key: str) -> str:
    return key.removeprefix("t5.")


def official_state_dict_to_ours(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Any official layout (or a mix, such as a T5 checkpoint merged with t5_projections.pt) -> ours.

    Understood: the official `T5TextConditionEncoder` state dict (`encoder.*`, `projection.*`,
    `projection_interpolation.*`); a transformers T5 checkpoint (`shared.weight`, `encoder.*`, and for
    a whole encoder-decoder `decoder.*` and `lm_head.*`, dropped), bare or under `t5.`;
    `t5_projections.pt` (nested `{label: {...}}`, bare or under `projections.`); and our own layout.
    Tensors are passed through, not copied. Raises KeyError on any other key or on two keys for one
    weight, except the tied token embedding: a checkpoint with both `shared.weight` and
    `encoder.embed_tokens.weight` holds it twice, and `shared.weight` (the source of the tie) wins.
    """
    ours: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, value in _flatten(state).items():
        target = _our_key(key)
        if target is None:
            continue
        if target in ours:
            pair = {_bare(key), _bare(sources[target])}
            if pair != {"shared.weight", "encoder.embed_tokens.weight"}:
                raise KeyError(f"{key!r} and {sources[target]!r} both map to {target!r}")
            if _bare(key) != "shared.weight":
                continue  # the tie's source, shared.weight, is already there
        ours[target], sources[target] = value, key
    return ours


# ---------------------------------------------------------------------------------------------------
# Tokenisation

BYT5 = "byt5"
SPIECE = "spiece.model"  # the sentencepiece model of a T5 tokenizer (hub repos and kvray's `tokenizer/`)
T5_EXTRA_IDS = 100


class T5SentencePieceTokenizer:
    """The official processor's tokenizer, `T5Tokenizer.from_pretrained('google/flan-ul2')` of transformers 4
    (the slow, sentencepiece-backed one, in its default legacy mode), on the sentencepiece library it wrapped.

    `encode(text)` follows that tokenizer's rules:

    * the special tokens written literally in the text (`</s>`, `<pad>`, `<unk>`, `<extra_id_0>` ...
      `<extra_id_99>`) are split out and become their ids;
    * each piece of text between them goes through `SentencePieceProcessor.encode` on its own (NFKC
      normalisation, whitespace collapsed, a "▁" prefixed to every piece: legacy mode), and each
      sentencepiece token becomes its id (a literal special token's id if it is one);
    * EOS is appended unless the ids already end with it;
    * `truncation=True, max_length=n`: when the ids plus an EOS exceed n, they are cut to n - 1
      before the EOS rule (so a cut that ends on a literal `</s>` gives n - 1 ids).

    `<extra_id_i>` is `piece_size + 99 - i`: after the sentencepiece vocabulary, in reverse, as
    transformers numbers them (32099 ... 32000 for Flan-UL2's 32000 pieces).
    """

    def __init__(self, model_file: str | Path, extra_ids: int = T5_EXTRA_IDS):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        # The old tokenizer strips the whitespace next to some literal special tokens (which ones depends
        # on its version and files); a model that drops whitespace at the ends of every piece of text,
        # as T5's does, makes that stripping irrelevant, and the rules above exact.
        if self.sp.normalize("  x  ") != self.sp.normalize("x"):
            raise ValueError(f"{model_file}: a sentencepiece model that keeps extra whitespace is not a T5 "
                             "tokenizer kvray can reproduce")
        size = self.sp.get_piece_size()
        self.special_ids = {token: self._piece_id(token, model_file) for token in ("<pad>", "</s>", "<unk>")}
        self.special_ids.update({f"<extra_id_{i}>": size + extra_ids - 1 - i for i in range(extra_ids)})
        self.pad_token_id, self.eos_token_id = self.special_ids["<pad>"], self.special_ids["</s>"]
        # No T5 special token contains another, so the leftmost match of an alternation is the split
        # the old tokenizer's trie makes.
        self._specials = re.compile("(" + "|".join(map(re.escape, self.special_ids)) + ")")
        self._size = size + extra_ids

    def _piece_id(self, piece: str, model_file) -> int:
        index = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(index) != piece:
            raise ValueError(f"{model_file}: no {piece} piece: not a T5 sentencepiece model")
        return index

    def __len__(self) -> int:
        return self._size

    def encode(self, text: str, max_length: int | None = None, truncation: bool = False) -> list[int]:
        ids: list[int] = []
        for index, part in enumerate(self._specials.split(text)):
            if index % 2:  # a literal special token
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.special_ids.get(piece, self.sp.piece_to_id(piece))
                           for piece in self.sp.encode(part, out_type=str))
        if truncation and max_length is not None and len(ids) + 1 > max_length:
            ids = ids[: max_length - 1]
        return ids if ids and ids[-1] == self.eos_token_id else [*ids, self.eos_token_id]


def build_tokenizer(name: str):
    """The tokenizer of a preset: `"byt5"` = transformers' `ByT5Tokenizer()` (needs no files, vocab 384,
    as the tiny preset's T5); anything else = the path of a T5 sentencepiece model (`spiece.model`,
    e.g. Flan-UL2's for Kandinsky Video 1.1), as a `T5SentencePieceTokenizer`.
    """
    if name == BYT5:
        import transformers

        return transformers.ByT5Tokenizer()
    return T5SentencePieceTokenizer(name)


class Tokens(NamedTuple):
    input_ids: torch.Tensor  # (B, tokens_length) int64, right-padded with the pad id
    attention_mask: torch.Tensor  # (B, tokens_length) int64, 1 on real tokens (EOS included)
    truncated: tuple[bool, ...]  # per prompt: its tokens (EOS included) did not fit in tokens_length


def tokenize(tokenizer, prompts: str | Sequence[str], tokens_length: int) -> Tokens:
    """As the official `T5TextConditionProcessor.encode`, batched: each prompt is tokenised with
    `max_length=tokens_length, truncation=True` (the tokenizer keeps its EOS last), then right-padded
    with `pad_token_id` to `tokens_length`, attention mask 1 on the tokens and 0 on the padding.
    `tokenizer`: from `build_tokenizer` (anything with `encode(text, max_length=, truncation=)` and `pad_token_id`).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids, masks, truncated = [], [], []
    for prompt in prompts:
        # Tokenised whole first only to tell whether the truncation below cut something.
        whole = tokenizer.encode(prompt)
        encoded = tokenizer.encode(prompt, max_length=tokens_length, truncation=True)
        pad = tokens_length - len(encoded)
        ids.append([*encoded, *[tokenizer.pad_token_id] * pad])
        masks.append([1] * len(encoded) + [0] * pad)
        truncated.append(len(whole) > tokens_length)
    return Tokens(
        torch.tensor(ids, dtype=torch.int64).reshape(len(ids), tokens_length),
        torch.tensor(masks, dtype=torch.int64).reshape(len(ids), tokens_length),
        tuple(truncated),
    )
