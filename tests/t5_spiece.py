"""A small T5-like sentencepiece model for tokenizer tests, and the texts to tokenise with it.

Trained as T5's vocabulary is laid out: unigram, `<pad>` = 0, `</s>` = 1, `<unk>` = 2, no BOS,
nmt_nfkc normalisation (whitespace collapsed), and no `<extra_id_N>` pieces: the tokenizer appends
those after the vocabulary, as for Flan-UL2's 32000 pieces. Training takes well under a second.
"""

from __future__ import annotations

import random
from pathlib import Path

import sentencepiece

# What transformers 4's slow T5Tokenizer made of the cases below with this model (`record_slow_t5_ids.py`).
SLOW_T5_IDS = Path(__file__).parent / "data" / "slow_t5_ids.json"


def corpus() -> list[str]:
    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "ne", "mo", "su", "la", "pe", "do", "gi", "an", "or", "ex", "il", "um", "ba"]
    english = ["a", "the", "red", "fox", "jumps", "over", "lazy", "dog", "in", "snow", "under", "blue", "sky", "with",
               "bright", "sun", "cat", "boat", "river", "city"]
    words = english + ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    lines = []
    for i in range(3000):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        if i % 5 == 0:
            line = line.capitalize() + "."
        if i % 11 == 0:
            line += " 東京 の 夜 景色"  # a few CJK characters known, the others unknown
        if i % 13 == 0:
            line += " café naïve, 42 ½"
        lines.append(line)
    return lines


def train_t5_like_spiece(directory: Path) -> Path:
    """`directory/spiece.model`, trained on `corpus()`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spiece.model"
    with open(path, "wb") as model:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()), model_writer=model, model_type="unigram", vocab_size=300,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc",
            character_coverage=1.0, num_threads=1, minloglevel=2)
    return path


# Plain text, odd whitespace, NFKC cases, emoji, CJK, literal special tokens, over-long prompts.
NAMED_CASES = [
    "a red fox jumps over the lazy dog", "A Red Fox.", "kato rine sula", "",
    "  leading", "trailing  ", "double  space", "tab\tsep", "new\nline", "cr\r\nlf", " \t\n ", " ",
    "ideographic\u3000space", "nbsp\u00a0here", "thin\u2009space", "line\u2028sep", "para\u2029sep",
    "zero\u200bwidth", "ｆｕｌｌ ｗｉｄｔｈ", "ﬁne ﬂower ﬀ", "①②③", "㎏ ㍻", "x² y₃", "Ⅻ", "ｶﾀｶﾅ", "é vs e\u0301",
    "½ fox", "😀", "😀😀 fox", "a 👍🏽 b", "family 👨\u200d👩\u200d👧", "🇯🇵 flag",
    "東京の夜景色", "未知の漢字 龘", "한국어 텍스트", "中文 fox",
    "</s>", "a </s> b", "a</s>b", "ends with </s>", "</s></s>", "</s> leading", "a  </s>  b",
    "<pad>", "x <pad> y", "x<pad>y", "<unk>", "<unk> fox", "<extra_id_0>", "fill <extra_id_0> here",
    "fill<extra_id_0>here", "<extra_id_99>", "<extra_id_10>x", "<extra_id_100>", "<extra_id_1 >", "<s>", "< /s>",
    "<PAD>", "＜/s＞", "<extra_id_0>\u2028x", "x\u3000<extra_id_0>", "▁underscore▁", "a ▁ b", "a\x01b", "\x0b\x0c",
    "word " * 200, "the red fox " * 60 + "</s>", "</s> " * 140,
]


def random_cases(count: int, seed: int = 1) -> list[str]:
    """Strings mixed from words, whitespace of every kind, special tokens and their parts, and characters
    that normalisation changes or the vocabulary lacks."""
    rng = random.Random(seed)
    parts = ["a", "red", "fox", "kato", "rine", " ", "  ", "\t", "\n", "\r", "\u3000", "\u00a0", "\u2028", "\u200b",
             "</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_7>", "<extra_id_99>", "<", ">", "/", "s", "_", "▁",
             "東", "京", "龘", "😀", "👍🏽", "\u200d", "ｆ", "ﬁ", "①", "é", "e\u0301", "½", ".", ",", "42", "\x01", "\x7f",
             "한", "ｶ", "Ⅻ", "'", '"', "-", "…"]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(0, 30))) for _ in range(count)]
