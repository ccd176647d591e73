"""Core data types shared by the engine, the backends and the deployments.

Words used throughout (as in the DEER paper):
  p  the target's distribution (after `process`: temperature, top-k, top-p)
  q  the drafter's distribution, processed the same way
  k  block size: draft tokens proposed per cycle
  anchor  the last token of the sequence: sampled from the target but not yet run through it
          (it has no target KV or hidden state yet). Every cycle starts from one.
  accepted  draft tokens kept in a cycle; output per cycle = accepted + 1 (correction or bonus)

Sequences are plain Python lists / 1-D int arrays of token ids; tensors carry shape comments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); the lossless check is exact token identity
    top_p: float = 1.0        # nucleus mass kept, in (0, 1]
    top_k: int = 0            # 0 = off
    max_new_tokens: int = 64
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class ScoreResult:
    """What a target backend returns for one sequence.

    logits: (n_query, V) float32 raw logits; row i is the distribution of the token AFTER
            query position i (query positions = the last n_query tokens of the call). None
            only when `greedy_ids` is given.
    hidden: (n_query, F) target features of the query positions, or None when not asked for.
    greedy_ids: (n_query,) argmax of each logits row, when a remote backend sent only that
            (greedy decoding needs nothing else; `deployments.verifier`).
    """

    logits: Optional[torch.Tensor]
    hidden: Optional[torch.Tensor] = None
    greedy_ids: Optional[torch.Tensor] = None

    def argmax(self) -> torch.Tensor:
        """(n_query,) the greedy token of each query position."""
        if self.greedy_ids is not None:
            return self.greedy_ids
        assert self.logits is not None, "a ScoreResult with neither logits nor greedy_ids"
        return self.logits.argmax(-1)


class TargetBackend(Protocol):
    """The verifier. Stateless API over a replica-local KV cache keyed by `seq_id`.

    Every call carries the FULL token ids of the sequence. The backend reuses its cached KV for
    the longest prefix that matches what it cached for `seq_id`, drops (rolls back) the rest,
    and runs the remaining tokens in one forward. A cache miss therefore recomputes instead of
    failing, and rollback after a rejection needs no separate call.
    """

    vocab_size: int
    eos_token_id: Optional[int]
    feature_dim: int  # F of `hidden` (0 if the backend cannot return features)

    def score(self, seq_id: str, token_ids: Sequence[int], n_query: int,
              return_hidden: bool = False) -> ScoreResult: ...

    def score_batch(self, seq_ids: Sequence[str], token_ids: Sequence[Sequence[int]],
                    n_query: Sequence[int], return_hidden: bool = False) -> list[ScoreResult]: ...

    def release(self, seq_id: str) -> None: ...


@dataclass
class DraftResult:
    """tokens: (k,) int64 draft tokens y_1..y_k.
    probs: (k, V) float32 q_i, the processed distribution each y_i was drawn from; None at
           temperature 0 (greedy acceptance needs only the tokens).
    conf:  (k,) float32 max_v q_i(v), the drafter's confidence at each position (at
           temperature 0 from the softmax of the raw logits), or None. It depends on the context
           only, never on the drawn y_i, so a drafter wrapper may act on it and stay lossless
           (`deer_serve.drafters.lookup`).
    alt:   (k,) int64 the drafter's most likely token other than y_i, or None: the guess of
           the target's correction when y_i is rejected (pipelined pre-drafts, engine)."""

    tokens: torch.Tensor
    probs: Optional[torch.Tensor] = None
    conf: Optional[torch.Tensor] = None
    alt: Optional[torch.Tensor] = None


class PendingDraft:
    """A draft call in flight: `result()` waits for its DraftResult (once); `cancel()` gives
    it up (best effort: a call the replica already runs finishes there, unused)."""

    def __init__(self, finish, cancel=None):
        self._finish, self._cancel, self._done = finish, cancel, None

    def result(self) -> DraftResult:
        if self._done is None:
            self._done = self._finish()
        return self._done

    def cancel(self) -> None:
        if self._cancel is not None and self._done is None:
            try:
                self._cancel()
            except Exception:  # noqa: BLE001 - best effort
                pass


class Drafter(Protocol):
    """Proposes a block of k tokens after `anchor` in ONE forward.

    context_ids: the verified tokens BEFORE the anchor (the target has run all of them).
    context_hidden: (len(context_ids), F) target features of those positions, required when the
                    drafter's `context_mode` is "target-features", else None. The drafter caches
                    its own per-`seq_id` prefix KV and only computes positions it has not cached.
    prefix: (optional keyword) tokens assumed to follow the anchor, not verified yet; the k
            drafts come after them. The engine's pipelining uses it (pre-drafts); drafters
            that take it may also offer `draft_async(...)` -> `PendingDraft`, sending the call
            without waiting (the engine runs `draft` in a thread for those that do not).
    """

    context_mode: str  # "tokens" | "target-features"

    def draft(self, seq_id: str, context_ids: Sequence[int], anchor: int, k: int,
              sampling: SamplingParams, generator: Optional[torch.Generator] = None,
              context_hidden: Optional[torch.Tensor] = None) -> DraftResult: ...

    def release(self, seq_id: str) -> None: ...


@dataclass
class GenerationResult:
    token_ids: list[int]                      # new tokens only (EOS not included)
    text: str = ""
    accept_lengths: list[int] = field(default_factory=list)  # accepted drafts per cycle
    finish_reason: str = "length"             # "length" | "stop"
    elapsed_s: float = 0.0
    cycles: int = 0
    timings: dict = field(default_factory=dict)  # seconds spent: draft / verify / other
    extra: dict = field(default_factory=dict)    # e.g. pipeline_hits / pipeline_misses

    @property
    def mean_accepted(self) -> float:
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0
