"""Prompt-lookup drafting, alone or spliced into a diffusion drafter's block.

Prompt lookup (PLD): find the latest earlier occurrence of the sequence's last n tokens and
propose what followed it. Code repeats itself, and this target's greedy text repeats a lot, so a
lookup hit is often right for many tokens.

`LookupDrafter(None)` is prompt lookup alone. `LookupDrafter(inner)` splices lookup into the
inner (diffusion) drafter's block: it keeps the block's confident head y_1..y_j (the longest
prefix whose product of confidences `DraftResult.conf` is at least `min_conf`), then looks up a
continuation of context + anchor + y_1..y_j, appends it, looks up again from the new end, and
so on; where a lookup finds nothing, the rest of the block is the inner drafter's tokens at
their own positions. A single-step diffusion block is good at the next few tokens and weak
further out, where a copy of earlier text often is right (HumanEval, first 40 prompts, T=0,
same cycle starts: accepted drafts per cycle 2.85 -> 3.49 at k=16, 3.19 -> 4.41 at k=32).

Lossless at any temperature: j depends only on the confidences, which depend only on the
context (never on the drawn tokens); a lookup token is a deterministic function of the tokens
before it, so its q is one-hot; the inner drafter's tokens keep their q_i (drawn independently
given the context). The acceptance rule then gets exactly the distribution each token came from.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from deer_serve.types import Drafter, DraftResult, PendingDraft, SamplingParams


def lookup_continuation(seq: np.ndarray, k: int, ngram_max: int = 3, ngram_min: int = 1) -> np.ndarray:
    """seq (L,) int -> up to k tokens that followed the latest earlier match of seq's last n
    tokens, for the largest n in [ngram_min, ngram_max] that matches; empty if none.
    One vectorised scan for the last token, then the few candidates are extended backwards."""
    L = len(seq)
    if L < 2:
        return seq[:0]
    cand = np.flatnonzero(seq[:L - 1] == seq[L - 1])        # ends of 1-token matches
    best_n, best_i = 0, -1
    for i in cand[::-1].tolist():                          # latest first
        n = 1
        while n < ngram_max and i - n >= 0 and seq[i - n] == seq[L - 1 - n]:
            n += 1
        if n > best_n:
            best_n, best_i = n, i
            if n >= ngram_max:
                break
    if best_n < ngram_min:
        return seq[:0]
    return seq[best_i + 1:best_i + 1 + k]


def splice_block(seq: np.ndarray, y: Sequence[int], conf: np.ndarray, min_conf: float = 0.35,
                 ngram_max: int = 4, ngram_min: int = 2,
                 max_len: Optional[int] = None) -> tuple[list[int], int, int]:
    """The splice (module docstring): seq = the context the block y follows, conf = y's
    per-position confidences. Keeps y's confident head (cumulative product >= min_conf), then
    appends lookup continuations while they match, then y's own tokens at their positions.
    With max_len above len(y), a lookup chain that runs unbroken past len(y) goes on up to
    max_len tokens (the block grows; still a function of the context alone). Returns (the
    block, its head's length j, how many of its tokens came from lookup: those at positions
    j .. j + spliced - 1)."""
    y = list(y)
    n = len(y)
    limit = max(n, int(max_len or n))
    j = int(np.count_nonzero(np.cumprod(np.asarray(conf, dtype=np.float64)) >= min_conf))
    z: list[int] = y[:j]
    spliced = 0
    while len(z) < limit:
        cont = lookup_continuation(np.concatenate([seq, np.asarray(z, dtype=np.int64)]),
                                   limit - len(z), ngram_max, ngram_min)
        if len(cont) == 0:
            break
        spliced += len(cont)
        z += cont.tolist()
    return z + y[len(z):], j, spliced


class LookupDrafter:
    def __init__(self, inner: Optional[Drafter] = None, ngram_max: Optional[int] = None,
                 ngram_min: Optional[int] = None, vocab_size: Optional[int] = None,
                 min_conf: float = 0.35):
        """n-grams of ngram_max..ngram_min tokens are matched; defaults: 3..1 alone (classic
        prompt lookup), 4..2 spliced (a block already has the drafter's guess to fall back on,
        so a one-token match is not worth it)."""
        self.inner = inner
        vocab_size = vocab_size or getattr(inner, "vocab_size", None)
        if vocab_size is None:
            raise ValueError("LookupDrafter needs vocab_size (the target's) when it has no inner drafter")
        self.vocab_size: int = vocab_size
        if not 0.0 <= min_conf <= 1.0:
            raise ValueError(f"min_conf must be in [0, 1], got {min_conf}")
        self.context_mode = inner.context_mode if inner is not None else "tokens"
        self.ngram_max = ngram_max or (3 if inner is None else 4)
        self.ngram_min = ngram_min or (1 if inner is None else 2)
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        self.min_conf = min_conf
        self.hits = self.calls = 0       # calls that used a lookup continuation / all calls
        self.spliced = self.drafted = 0  # draft tokens from lookup / all draft tokens proposed

    def draft(self, seq_id: str, context_ids: Sequence[int], anchor: int, k: int,
              sampling: SamplingParams, generator: Optional[torch.Generator] = None,
              context_hidden: Optional[torch.Tensor] = None,
              prefix: Sequence[int] = ()) -> DraftResult:
        seq = self._seq(context_ids, anchor, prefix)
        if self.inner is None:
            return self._lookup_only(seq, anchor if not len(prefix) else prefix[-1], k, sampling)
        kw = {"prefix": prefix} if len(prefix) else {}
        return self._splice(seq, self.inner.draft(seq_id, context_ids, anchor, k, sampling,
                                                  generator, context_hidden, **kw))

    @property
    def draft_async(self):
        """Only when the inner drafter sends calls without waiting (a remote one): then the
        inner call is in flight and the lookup runs when the result is asked for."""
        if not hasattr(self.inner, "draft_async"):
            raise AttributeError("draft_async")  # hasattr() is False: the engine uses a thread
        return self._draft_async

    def _draft_async(self, seq_id: str, context_ids: Sequence[int], anchor: int, k: int,
                     sampling: SamplingParams, generator: Optional[torch.Generator] = None,
                     context_hidden: Optional[torch.Tensor] = None,
                     prefix: Sequence[int] = ()) -> PendingDraft:
        seq = self._seq(context_ids, anchor, prefix)
        # reached only through the `draft_async` property, which checked this
        assert self.inner is not None and hasattr(self.inner, "draft_async")
        inner = self.inner.draft_async(seq_id, context_ids, anchor, k, sampling, generator,
                                       context_hidden, prefix)
        return PendingDraft(lambda: self._splice(seq, inner.result()), inner.cancel)

    def splice(self, context_ids: Sequence[int], anchor: int, d: DraftResult) -> DraftResult:
        """Lookup spliced into the block `d` the inner drafter made after context + anchor (a
        caller that ran the inner drafter itself, batched: deer_serve.step_engine)."""
        return self._splice(self._seq(context_ids, anchor, ()), d)

    @staticmethod
    def _seq(context_ids, anchor, prefix) -> np.ndarray:
        return np.fromiter((*context_ids, anchor, *prefix), dtype=np.int64,
                           count=len(context_ids) + 1 + len(prefix))

    def _splice(self, seq: np.ndarray, d: DraftResult) -> DraftResult:
        """seq: the context, anchor (and prefix) the block follows; d: the inner block."""
        self.calls += 1
        if d.conf is None:
            raise ValueError("the inner drafter gives no confidences (DraftResult.conf)")
        y = d.tokens.tolist()
        n = len(y)
        z, j, spliced = splice_block(seq, y, d.conf.double().numpy(), self.min_conf,
                                     self.ngram_max, self.ngram_min)
        self.drafted += n
        if not spliced:
            return d
        from_lookup = list(range(j, j + spliced))
        self.hits += 1
        self.spliced += spliced
        tokens = torch.tensor(z, dtype=d.tokens.dtype)
        probs = d.probs
        if probs is not None:
            probs = probs.clone()
            idx = torch.tensor(from_lookup)
            probs[idx] = 0.0
            probs[idx, tokens[idx]] = 1.0  # a lookup token is deterministic: q is one-hot
        return DraftResult(tokens=tokens, probs=probs, conf=d.conf, alt=d.alt)

    def _lookup_only(self, seq: np.ndarray, anchor: int, k: int,
                     sampling: SamplingParams) -> DraftResult:
        self.calls += 1
        cont = lookup_continuation(seq, k, self.ngram_max, self.ngram_min)
        self.hits += len(cont) > 0
        if len(cont) == 0:  # nothing to propose: repeat the anchor (a cheap, valid guess)
            cont = np.array([anchor])
        tokens = torch.from_numpy(cont.copy())
        self.drafted += len(tokens)
        probs = None
        if not sampling.greedy:
            probs = torch.zeros(len(tokens), self.vocab_size)
            probs[torch.arange(len(tokens)), tokens] = 1.0  # q is one-hot: deterministic proposal
        return DraftResult(tokens=tokens, probs=probs)

    @property
    def last_replica(self) -> Optional[str]:
        """The replica that answered the inner drafter's last call (remote drafters; tracing)."""
        return getattr(self.inner, "last_replica", None)

    def release(self, seq_id: str) -> None:
        if self.inner is not None:
            self.inner.release(seq_id)
