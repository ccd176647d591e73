"""The calls a request's decode asks its driver to run, and the driver that runs them one by one.

The per-request decode (`deer_serve.engine._decode`) is written once, as a generator that
yields what it needs and receives the answer:

    Plan(want)        -> the block size to use, in [0, want] (0 = a plain AR step)
    Draft(...)        -> a DraftResult of the request's drafter
    Score(...)        -> a ScoreResult of the target
    StepOutput        -> None (the step's tokens, for the request's consumer)

and returns its GenerationResult. `run_direct` executes each call at once against one target
and drafter (`iter_generate`); `deer_serve.step_engine.StepEngine` drives many requests'
generators together and executes each phase's calls batched (one draft forward, one verify
forward per step). Answers never depend on the call's driver beyond float rounding of batched
forwards, so the exactness arguments of the engine hold for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Optional

import torch

from deer_serve.types import GenerationResult, SamplingParams

if TYPE_CHECKING:
    from deer_serve.engine import StepOutput


@dataclass
class Plan:
    """Ask for this cycle's block size: `want` is the request's own choice (its AdaptiveK or
    block_size, within its token budget); the answer is at most that. A driver may give less
    (a batch's verify budget) but must decide from past steps and the batch only."""
    want: int


@dataclass
class Draft:
    """drafter.draft(seq_id, ctx, anchor, k, sampling, gen, feats)."""
    ctx: list[int]                     # verified tokens before the anchor
    anchor: int
    k: int
    sampling: SamplingParams
    gen: Optional[torch.Generator]     # the request's own generator (draws y ~ q)
    feats: Optional[torch.Tensor]      # (len(ctx), F) target features, target-features mode


@dataclass
class Score:
    """target.score(seq_id, ids, n_query, return_hidden[, n_hidden])."""
    ids: list[int]                     # the full sequence
    n_query: int
    return_hidden: bool = False
    n_hidden: Optional[int] = None     # feature rows (default n_query); set at a features prefill


def run_direct(core: Generator, target, drafter, seq_id: str
               ) -> Generator["StepOutput", None, GenerationResult]:
    """Drive one request's decode generator, each call run at once; yields its StepOutputs and
    returns its result. drafter: the request's drafter (None in mode ar). Closing this
    generator closes the decode and releases the sequence's caches in both backends."""
    from deer_serve.engine import StepOutput

    answer: Any = None
    try:
        while True:
            try:
                call = core.send(answer)
            except StopIteration as stop:
                return stop.value
            if isinstance(call, StepOutput):
                answer = None
                yield call
            elif isinstance(call, Plan):
                answer = call.want
            elif isinstance(call, Score):
                if call.n_hidden is None:
                    answer = target.score(seq_id, call.ids, call.n_query,
                                          return_hidden=call.return_hidden)
                else:
                    answer = target.score(seq_id, call.ids, call.n_query, return_hidden=True,
                                          n_hidden=call.n_hidden)
            elif isinstance(call, Draft):
                answer = drafter.draft(seq_id, call.ctx, call.anchor, call.k, call.sampling,
                                       call.gen, call.feats)
            else:
                raise TypeError(f"unknown decode call {call!r}")
    finally:
        core.close()  # its pending pre-drafts first: they may run on the drafter's cache
        target.release(seq_id)
        if drafter is not None:
            drafter.release(seq_id)
