"""The Flan-UL2 tokenizer: the ids of the official processor (transformers 4's slow, sentencepiece T5Tokenizer)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import sentencepiece

from kvray.models.text_encoder import (
    T5SentencePieceTokenizer,
    build_tokenizer,
    tokenize,
)

from .t5_spiece import SLOW_T5_IDS, corpus, train_t5_like_spiece

TOKENS_LENGTH = 128  # the official processor's tokens_length


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    return train_t5_like_spiece(tmp_path_factory.mktemp("spiece"))


@pytest.fixture(scope="module")
def tokenizer(spiece) -> T5SentencePieceTokenizer:
    return build_tokenizer(str(spiece))


@pytest.fixture(scope="module")
def sp(spiece):
    return sentencepiece.SentencePieceProcessor(model_file=str(spiece))


def test_ids_are_the_slow_t5_tokenizers(spiece, tokenizer):
    """Every case (plain, whitespace, NFKC, emoji, CJK, literal special tokens, over-long, 300 random mixes)
    gives the ids transformers 4.57's slow T5Tokenizer gave, whole and as the official call cuts them."""
    record = json.loads(SLOW_T5_IDS.read_text())
    assert hashlib.sha256(spiece.read_bytes()).hexdigest() == record["model_sha256"], \
        "sentencepiece trained another model than the ids were recorded with (another sentencepiece version?)"
    texts = [text for text, _, _ in record["cases"]]
    tokens = tokenize(tokenizer, texts, TOKENS_LENGTH)
    for (text, ids, ids_128), row, mask, cut in zip(record["cases"], tokens.input_ids, tokens.attention_mask,
                                                    tokens.truncated):
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.encode(text, max_length=TOKENS_LENGTH, truncation=True) == ids_128, text
        # The official right-padding of that call.
        assert row.tolist() == ids_128 + [tokenizer.pad_token_id] * (TOKENS_LENGTH - len(ids_128)), text
        assert mask.tolist() == [1] * len(ids_128) + [0] * (TOKENS_LENGTH - len(ids_128)), text
        assert cut == (len(ids) > TOKENS_LENGTH), text
    assert sum(tokens.truncated) >= 2  # the over-long cases are there


def test_the_rules_on_top_of_sentencepiece(tokenizer, sp):
    eos, unk, size = 1, 2, sp.get_piece_size()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1) and len(tokenizer) == size + 100

    def plain(text):
        return sp.encode(text)

    assert tokenizer.encode("a red fox") == plain("a red fox") + [eos]
    assert tokenizer.encode("") == [eos]
    # Whitespace collapsed and trimmed, tabs and newlines too; NFKC folds compatibility characters.
    assert tokenizer.encode("  a  red\tfox\n") == tokenizer.encode("a\u3000red\r\nfox") == tokenizer.encode("a red fox")
    assert tokenizer.encode("ｆｏｘ ﬁsh") == tokenizer.encode("fox fish")
    # Characters outside the vocabulary are <unk>; known CJK characters are not.
    assert unk in tokenizer.encode("😀 fox") and unk not in tokenizer.encode("東京")
    # Literal special tokens are split out; each side is encoded on its own.
    assert tokenizer.encode("a </s> b") == plain("a") + [eos] + plain("b") + [eos]
    assert tokenizer.encode("x<pad>y") == plain("x") + [0] + plain("y") + [eos]
    assert tokenizer.encode("<unk>") == [unk, eos]
    assert tokenizer.encode("<extra_id_0> fox") == [size + 99] + plain("fox") + [eos]
    assert tokenizer.encode("<extra_id_99>") == [size, eos]
    assert tokenizer.encode("<extra_id_100>") == plain("<extra_id_100>") + [eos]  # only 0 to 99 exist
    assert tokenizer.encode("＜/s＞") == plain("＜/s＞") + [eos]  # NFKC folds it later: never a special token
    # EOS is added unless the ids end with it already.
    assert tokenizer.encode("fox </s>") == plain("fox") + [eos]
    assert tokenizer.encode("</s></s>") == [eos, eos]
    # Truncation keeps EOS last; a cut that ends on a literal </s> is one id shorter.
    long = tokenizer.encode("the red fox " * 100, max_length=TOKENS_LENGTH, truncation=True)
    assert len(long) == TOKENS_LENGTH and long[-1] == eos and long[:-1] == plain("the red fox " * 100)[:127]
    assert tokenizer.encode("</s> " * 140, max_length=TOKENS_LENGTH, truncation=True) == [eos] * 127
    tokens = tokenize(tokenizer, ["the red fox " * 100, "a red fox"], TOKENS_LENGTH)
    assert tokens.truncated == (True, False) and tokens.attention_mask.sum(-1).tolist() == [128, len(plain("a red fox")) + 1]


def test_a_model_that_keeps_whitespace_is_refused(tmp_path):
    model = tmp_path / "keeps.model"
    with open(model, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()), model_writer=f, model_type="unigram", vocab_size=300, pad_id=0,
            eos_id=1, unk_id=2, bos_id=-1, remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    with pytest.raises(ValueError, match="keeps extra whitespace"):
        build_tokenizer(str(model))


def test_default_tokenizer_from_the_hub_cache_offline(spiece, tokenizer, tmp_path):
    """kv11 without converted weights: Flan-UL2's spiece.model through huggingface_hub's cache, offline."""
    snapshot = tmp_path / "hub" / "models--google--flan-ul2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    (snapshot / "spiece.model").write_bytes(spiece.read_bytes())
    code = ("from kvray.config.models import ModelSource; from kvray.weights.stage_models import load_tokenizer;"
            f"t = load_tokenizer(ModelSource(preset='kv11', weights='random', cache_dir={str(tmp_path)!r}));"
            "print(type(t).__name__, t.encode('a red fox <extra_id_0>'))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(maxsplit=1) == ["T5SentencePieceTokenizer",
                                            f"{tokenizer.encode('a red fox <extra_id_0>')}\n"]
