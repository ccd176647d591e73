"""Pipelining (DESIGN.md section 2): block b+1 is drafted while block b is verified, for the
most likely outcome of b, and used only when the verifier agrees. `deer_serve.engine` drives it
(`iter_generate(pipeline=True)`); the step engine does not pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from deer_serve.types import PendingDraft

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor


class Pipeliner:
    """Pre-drafts block b+1 while block b is verified (DESIGN.md section 2, pipelining).

    The hypothesis is the most likely outcome of b by the drafter's own confidences c_i:
    m = argmax_m P(exactly m accepted) = prod_{i<=m} c_i * (1 - c_{m+1}), and the target's
    correction at m+1 is the drafter's runner-up there (`DraftResult.alt`). The pre-draft
    reads the same verified context and the block [anchor, y_1..y_m, guess, masks] (the
    unverified tokens as the drafter's `prefix`). It is used only when block b's outcome is
    exactly that (m accepted, next token == guess): then its context IS the verified one, and
    any proposal drawn from the context alone keeps the acceptance rule exact. (A whole block
    accepted needs a guess of the bonus token, which the drafter does not make: not a
    hypothesis here.)

    Remote drafters send the pre-draft at once (`draft_async`); for in-process ones it runs in
    a thread of its own, and a missed one is waited for before the next draft of the same
    sequence (one cache)."""

    def __init__(self, drafter, min_p: float = 0.0):
        """min_p: pre-draft only when the hypothesis's probability P(exactly m) is at least
        this (0 = always); below it the next block is drafted after the verify, as without
        pipelining, and no compute is spent on a likely miss."""
        self.drafter = drafter
        self.min_p = float(min_p)
        self._pool: Optional[ThreadPoolExecutor] = None
        self.hits = self.misses = self.skipped = 0
        self.record: Optional[list] = None  # [(P(hypothesis), hit)] when a list (calibration)

    def submit(self, *args, **kw) -> PendingDraft:
        if hasattr(self.drafter, "draft_async"):
            return self.drafter.draft_async(*args, **kw)
        from concurrent.futures import ThreadPoolExecutor, wait

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="deer-predraft")
        fut = self._pool.submit(self.drafter.draft, *args, **kw)

        def drop():  # the thread may be running on this sequence's cache: let it finish
            if not fut.cancel():
                wait([fut])

        return PendingDraft(fut.result, drop)

    @staticmethod
    def hypothesis(d, drafts: list[int]) -> Optional[tuple[int, int, float]]:
        """(m, guess, P(exactly m accepted)) for the block `drafts` drafted as `d`, or None
        without confidences."""
        if d.conf is None or d.alt is None or not drafts:
            return None
        c = d.conf[:len(drafts)].double()
        head = torch.cat([torch.ones(1, dtype=c.dtype), torch.cumprod(c, 0)[:-1]])  # prod_{i<m}
        pm = head * (1 - c)                                                         # (k,)
        m = int(torch.argmax(pm))
        guess = int(d.alt[m])
        if guess == drafts[m]:  # a spliced-in token equals the runner-up: no such outcome
            return None
        return m, guess, float(pm[m])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
