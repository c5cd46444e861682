"""Prompt hygiene at planning: exact duplicates after normalisation (Unicode NFKC, case folding, whitespace).

`normalise_prompt` is the equality that counts; `prompt_key` names a row's normalised prompt(s) (a mini-movie:
all its scenes, in order) so that planning can count duplicates, or render one video per distinct
(prompt_key, seed).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def normalise_prompt(text: str) -> str:
    """NFKC (full-width and compatibility forms to their plain ones), case folded, runs of whitespace as one
    space, no leading or trailing whitespace: `"  Ａ  Red\tCAR "` -> `"a red car"`."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def prompt_key(prompts: str | Sequence[str]) -> str:
    """16 hex characters naming a row's normalised prompt, or its scenes' prompts in order."""
    scenes = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    joined = "\x1f".join(normalise_prompt(p) for p in scenes)  # unit separator: never inside a normalised prompt
    return hashlib.blake2b(joined.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class DuplicatePrompts:
    rows: int
    distinct: int
    most_repeated: tuple[tuple[str, int], ...]  # (normalised prompt, rows), most rows first

    @property
    def duplicate_rows(self) -> int:
        """Rows whose normalised prompt(s) repeat an earlier row's."""
        return self.rows - self.distinct

    def line(self) -> str:
        if not self.duplicate_rows:
            return f"prompts: {self.rows} rows, no duplicates after normalisation"
        top = ", ".join(f"{text!r} x{count}" for text, count in self.most_repeated)
        return (f"prompts: {self.rows} rows, {self.distinct} distinct after normalisation "
                f"({self.duplicate_rows} duplicate rows); most repeated: {top}")


def count_duplicates(prompts: Sequence[str | Sequence[str]], top: int = 3) -> DuplicatePrompts:
    """Duplicates among rows' prompts (a string, or a mini-movie's scene prompts). Memory: 8 bytes a row."""
    keys = np.fromiter((int(prompt_key(p), 16) for p in prompts), dtype=np.uint64, count=len(prompts))
    unique, first, counts = np.unique(keys, return_index=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    most = tuple((_shown(prompts[first[i]]), int(counts[i])) for i in order if counts[i] > 1)
    return DuplicatePrompts(rows=len(prompts), distinct=len(unique), most_repeated=most)


def _shown(prompts: str | Sequence[str]) -> str:
    return normalise_prompt(prompts) if isinstance(prompts, str) else " | ".join(map(normalise_prompt, prompts))
