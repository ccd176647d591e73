"""The decode session's two drivers, `run_session` (the Router's worker thread, `loop: router`)
and `arun_session` (the Router's event loop, the segment loops colocated / engine / vllm), over
segments that fail on a script: each resumed segment starts from the prompt + every token
emitted before it (so the output is the uninterrupted one), a drafter failure finishes the
request in plain AR, the resume budget ends in VerifierUnavailable, and both drivers give the
same Outcome.

The segment decodes a fixed rule from its own token ids (next = (7 * last + 3) mod 50, three
tokens a step, as a verifier decoding greedily from what it was sent), so a segment that started
from the wrong tokens continues wrongly, or sends tokens again. Power: a session that forgets the
tokens of a failed segment's steps (planted in `_Session.step`) fails the identity check.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deer_serve.engine import StepOutput
from deer_serve.types import GenerationResult, SamplingParams
from deployments import session as session_mod
from deployments.clients import DrafterUnavailable, VerifierUnavailable
from deployments.session import DecodeSpec, arun_session, run_session

PROMPT = [5, 11, 17]
MAX_NEW = 20


def rule(ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append((7 * out[-1] + 3) % 50)
    return out[len(ids):]


REFERENCE = rule(PROMPT, MAX_NEW)


class Script:
    """Segments that decode `rule` from their spec; segment i fails after `fails[i]` steps
    (a (steps, exception) pair), and records every spec it was sent."""

    def __init__(self, fails: dict[int, tuple[int, Exception]]):
        self.fails, self.specs = fails, []

    def steps(self, spec: DecodeSpec):
        i = len(self.specs)
        self.specs.append(spec)
        ids = np.asarray(spec.token_ids).tolist()
        new = rule(ids, spec.sampling.max_new_tokens)
        fail = self.fails.get(i)
        for n, at in enumerate(range(0, len(new), 3)):
            if fail is not None and n == fail[0]:
                raise fail[1]
            yield StepOutput(new[at:at + 3], None if n == 0 else 2)
        return GenerationResult(token_ids=new, accept_lengths=[2] * ((len(new) - 1) // 3),
                                cycles=(len(new) - 1) // 3)

    def sync_segment(self, spec: DecodeSpec, timeout: float):
        return self.steps(spec)

    async def async_segment(self, spec: DecodeSpec, timeout: float):
        it = self.steps(spec)
        while True:
            try:
                step = next(it)
            except StopIteration as stop:
                yield "done", stop.value
                return
            yield "step", step


def first_spec() -> DecodeSpec:
    return DecodeSpec(token_ids=np.asarray(PROMPT, dtype=np.int32), emitted=0,
                      sampling=SamplingParams(max_new_tokens=MAX_NEW), mode="deer", block_size=2,
                      seq_id="r", adaptive_k=False, pipeline=False, lookup=False,
                      drafter_timeout_s=1.0)


OPTS = dict(resumes=3, resume_window_s=600.0, verifier_timeout_s=5.0)


def drive(driver: str, fails: dict) -> tuple[Script, list[int], object, list[str]]:
    """(the script, the streamed token ids, the Outcome, the fallbacks) of one request."""
    script, kinds = Script(fails), []
    if driver == "sync":
        it = run_session(script.sync_segment, first_spec(), on_fallback=kinds.append, **OPTS)
        streamed = []
        while True:
            try:
                streamed += next(it).new_token_ids
            except StopIteration as stop:
                return script, streamed, stop.value, kinds

    async def go():
        streamed, outcome = [], None
        async for kind, val in arun_session(script.async_segment, first_spec(),
                                            on_fallback=kinds.append, **OPTS):
            if kind == "step":
                streamed.extend(val.new_token_ids)
            else:
                outcome = val
        return streamed, outcome

    streamed, outcome = asyncio.run(go())
    return script, streamed, outcome, kinds


FAILS = {0: (2, VerifierUnavailable("replica died")), 1: (1, DrafterUnavailable("drafter died")),
         2: (3, VerifierUnavailable("replica died again"))}


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_resumed_segments_continue_from_the_emitted_tokens(driver):
    script, streamed, o, kinds = drive(driver, FAILS)
    assert streamed == REFERENCE and o.token_ids == REFERENCE
    assert kinds == ["verifier_resume", "drafter_to_ar", "verifier_resume"]
    assert o.fallback and [s.mode for s in script.specs] == ["deer", "deer", "ar", "ar"]
    # each segment: the prompt + what was emitted before it, and the rest of the budget
    emitted = [0, 6, 9, 18]
    for spec, e in zip(script.specs, emitted):
        assert np.asarray(spec.token_ids).tolist() == PROMPT + REFERENCE[:e]
        assert spec.emitted == e and spec.sampling.max_new_tokens == MAX_NEW - e
    assert [s.seq_id for s in script.specs] == ["r-0", "r-1", "r-2", "r-3"]


def test_both_drivers_give_the_same_outcome():
    assert drive("sync", FAILS)[2] == drive("async", FAILS)[2]


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_the_resume_budget_ends_in_verifier_unavailable(driver):
    always = {i: (1, VerifierUnavailable("down")) for i in range(10)}
    with pytest.raises(VerifierUnavailable):
        drive(driver, always)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_session_that_forgets_a_failed_segments_tokens_is_caught(driver, monkeypatch):
    """Power: the step counted but its tokens not kept, so the resumed segment starts short."""
    real = session_mod._Session.step

    def forgetful(self, step):
        real(self, step)
        if self.seg == 0:
            del self.out[len(self.out) - len(step.new_token_ids):]

    monkeypatch.setattr(session_mod._Session, "step", forgetful)
    _, streamed, o, _ = drive(driver, FAILS)
    # the resumed segment decodes the forgotten tokens again: the client gets them twice
    assert not (streamed == REFERENCE and o.token_ids == REFERENCE)
