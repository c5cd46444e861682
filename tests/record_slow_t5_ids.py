"""Records the ids that transformers 4's slow `T5Tokenizer` gives, for `test_tokenizer.py` to compare with.

Run from the repository root in an environment with transformers 4.x and sentencepiece (not kvray's:
transformers 5 has no slow T5Tokenizer any more):

    python -m tests.record_slow_t5_ids

It trains the test model (sentencepiece training is deterministic: its hash is recorded, and the test
checks it) and writes `tests/data/slow_t5_ids.json`: each text with `tokenizer(text)["input_ids"]` and
`tokenizer(text, max_length=128, truncation=True)["input_ids"]`, the official processor's call.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import sentencepiece
import transformers

from .t5_spiece import NAMED_CASES, SLOW_T5_IDS, random_cases, train_t5_like_spiece

RANDOM_CASES = 300


def main() -> None:
    assert transformers.__version__.startswith("4."), "needs transformers 4 (the slow T5Tokenizer)"
    with tempfile.TemporaryDirectory() as scratch:
        model = train_t5_like_spiece(Path(scratch))
        # Legacy behaviour, as T5Tokenizer.from_pretrained('google/flan-ul2') (whose files set no `legacy`).
        tokenizer = transformers.T5Tokenizer(vocab_file=str(model))
        assert not tokenizer.is_fast and tokenizer.legacy
        cases = [*NAMED_CASES, *random_cases(RANDOM_CASES)]
        record = {
            "transformers": transformers.__version__, "sentencepiece": sentencepiece.__version__,
            "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
            "cases": [[text, tokenizer(text)["input_ids"], tokenizer(text, max_length=128, truncation=True)["input_ids"]]
                      for text in cases],
        }
    SLOW_T5_IDS.parent.mkdir(exist_ok=True)
    SLOW_T5_IDS.write_text(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
