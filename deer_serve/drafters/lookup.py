"""Prompt-lookup drafting, alone or merged with a diffusion drafter.

Prompt lookup (PLD): find the latest earlier occurrence of the sequence's last n tokens and
propose what followed it. Code repeats itself, and this target's greedy text repeats a lot, so a
lookup hit is often right for many tokens.

`LookupDrafter(inner)` proposes the lookup continuation when the last `ngram_max`..`ngram_min`
tokens occurred before with at least `min_tokens` tokens after them, and the inner (diffusion)
drafter's block otherwise. Lossless at any temperature: the choice depends only on the verified
context, and a lookup proposal is deterministic, so its q is one-hot at each proposed token (the
acceptance rule then accepts y_i with probability p_i(y_i)).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from deer_serve.types import Drafter, DraftResult, SamplingParams


def lookup_continuation(seq: np.ndarray, k: int, ngram_max: int = 3, ngram_min: int = 1) -> np.ndarray:
    """seq (L,) int -> up to k tokens that followed the latest earlier match of seq's last n
    tokens, for the largest n in [ngram_min, ngram_max] that matches; empty if none."""
    L = len(seq)
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:L - 1], n)  # starts 0..L-1-n
        hits = np.flatnonzero((windows == seq[L - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return seq[start:start + k]
    return seq[:0]


class LookupDrafter:
    def __init__(self, inner: Optional[Drafter] = None, ngram_max: int = 3, ngram_min: int = 1,
                 min_tokens: int = 1, vocab_size: Optional[int] = None):
        self.inner = inner
        self.vocab_size = vocab_size or getattr(inner, "vocab_size", None)
        if self.vocab_size is None:
            raise ValueError("LookupDrafter needs vocab_size (the target's) when it has no inner drafter")
        self.context_mode = inner.context_mode if inner is not None else "tokens"
        self.ngram_max, self.ngram_min, self.min_tokens = ngram_max, ngram_min, min_tokens
        self.hits = self.calls = 0

    def draft(self, seq_id: str, context_ids: Sequence[int], anchor: int, k: int,
              sampling: SamplingParams, generator: Optional[torch.Generator] = None,
              context_hidden: Optional[torch.Tensor] = None) -> DraftResult:
        self.calls += 1
        seq = np.fromiter((*context_ids, anchor), dtype=np.int64, count=len(context_ids) + 1)
        cont = lookup_continuation(seq, k, self.ngram_max, self.ngram_min)
        if len(cont) >= self.min_tokens or self.inner is None:
            self.hits += len(cont) > 0
            if len(cont) == 0:  # nothing to propose: repeat the anchor (a cheap, valid guess)
                cont = np.array([anchor])
            tokens = torch.from_numpy(cont.copy())
            probs = None
            if not sampling.greedy:
                probs = torch.zeros(len(tokens), self.vocab_size)
                probs[torch.arange(len(tokens)), tokens] = 1.0  # q is one-hot: deterministic proposal
            return DraftResult(tokens=tokens, probs=probs)
        return self.inner.draft(seq_id, context_ids, anchor, k, sampling, generator, context_hidden)

    def release(self, seq_id: str) -> None:
        if self.inner is not None:
            self.inner.release(seq_id)
