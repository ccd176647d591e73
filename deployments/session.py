"""One request's decode session: the engine's loop (`deer_serve.engine.iter_generate`) in
segments, with the drafter-to-AR fallback and the verifier resume. No acceptance, sampling or
caching here.

A segment ends at a drafter failure (`DrafterUnavailable`: the rest is plain AR, and the stats
say `fallback: true`) or a verifier failure (`VerifierUnavailable`: the rest is resumed, at most
`verifier_resumes` times within `verifier_resume_window_s`, else 503 / UNAVAILABLE). Each new
segment starts from prompt + the tokens emitted so far, so greedy output is the target's plain
AR output whatever happens.

Every host of the loop uses these generators. The Router runs one session per request: under
`loop: router` `run_session` in a worker thread, its segments `run_segment` over `RemoteTarget`
/ `RemoteDrafter`; under the segment loops (colocated, engine, vllm) `arun_session` in its event
loop, each segment one streaming call to a Verifier replica (`clients.aremote_segment`), which
decodes it with its own drafter (`Verifier.decode`). Both drivers share the session's state
(`_Session`). A segment travels as a `DecodeSpec`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncGenerator, Callable, Generator, Optional, Sequence

import numpy as np

from deer_serve.adaptive import gate_for
from deer_serve.engine import StepOutput, iter_generate
from deer_serve.types import GenerationResult, SamplingParams
from deployments.clients import DrafterUnavailable, VerifierUnavailable
from deployments.schemas import DeerStats

log = logging.getLogger("deer_serve.router")


@dataclass
class DecodeSpec:
    """One segment of a request's decode loop (what `Verifier.decode` is sent)."""

    token_ids: np.ndarray     # (T,) int32: the prompt + the tokens emitted before this segment
    emitted: int              # how many of those T are emitted tokens (stop strings read them)
    sampling: SamplingParams  # max_new_tokens: what is left of the request's
    mode: str                 # "deer" | "ar"
    block_size: int           # draft tokens per cycle (the largest, with adaptive_k)
    seq_id: str               # the segment's KV cache key in the replicas
    adaptive_k: bool          # k per cycle from the request's acceptance (adaptive.AdaptiveK)
    pipeline: bool            # pre-draft the next block during each verify (engine.Pipeliner)
    lookup: bool              # prompt lookup spliced into the drafts (ServiceOptions.lookup)
    drafter_timeout_s: float  # a slower draft -> DrafterUnavailable
    streamed: bool = True     # False: nobody reads the steps before the result (a non-streamed
    #                           request), so a Verifier decoding the segment sends one reply


@dataclass
class Outcome:
    """A finished request: its tokens and the stats of its `deer` object."""

    token_ids: list[int]
    accept_lengths: list[int]
    cycles: int
    finish_reason: str
    fallback: bool
    timings: dict = field(default_factory=dict)
    pipeline: Optional[dict] = None  # {"hits", "misses"} when the request pipelined

    def stats(self) -> DeerStats:
        a = self.accept_lengths
        pipe = self.pipeline or {}
        return DeerStats(accept_lengths=a, mean_accepted=sum(a) / len(a) if a else 0.0,
                         cycles=self.cycles, fallback=self.fallback,
                         timings={k: round(v, 6) for k, v in self.timings.items()},
                         pipeline_hits=pipe.get("hits"), pipeline_misses=pipe.get("misses"))


# (the segment's spec, its verifier timeout in seconds) -> the segment's decode generator
Segment = Callable[[DecodeSpec, float], Generator[StepOutput, None, GenerationResult]]
# the same, as an async generator: ("step", StepOutput) ... then ("done", GenerationResult)
AsyncSegment = Callable[[DecodeSpec, float], AsyncGenerator[tuple[str, Any], None]]


class _Session:
    """What `run_session` and `arun_session` keep between segments: the tokens emitted, the
    accept counts, the resumes and the give-up time; each method is one turn of the loop."""

    def __init__(self, first: DecodeSpec, *, resumes: int, resume_window_s: float,
                 verifier_timeout_s: float, fallback: bool,
                 on_step: Callable[[StepOutput], Any], on_fallback: Callable[[str], Any]):
        self.first, self.fallback = first, fallback
        self.resumes, self.resume_window_s = resumes, resume_window_s
        self.verifier_timeout_s = verifier_timeout_s
        self.on_step, self.on_fallback = on_step, on_fallback
        self.prompt = np.asarray(first.token_ids, dtype=np.int32).tolist()
        self.out: list[int] = []
        self.accepts: list[int] = []
        self.mode, self.cycles, self.resumed = first.mode, 0, 0
        self.give_up_at: Optional[float] = None
        self.pipe = {"hits": 0, "misses": 0} if first.pipeline and self.mode == "deer" else None
        # the segment under way: its index, the tokens emitted before it, its steps so far and
        # where its accept counts start
        self.seg, self.steps, self.seg_accepts = -1, 0, 0
        self.prev: list[int] = []

    def next_segment(self) -> tuple[DecodeSpec, float]:
        """The next segment's spec (from the prompt + the tokens emitted so far) and its
        verifier timeout; VerifierUnavailable when the segments are spent."""
        self.seg += 1
        if self.seg >= self.resumes + 2:  # (+1 drafter fallback)
            raise VerifierUnavailable("the request was resumed too many times")
        first, prev = self.first, list(self.out)
        self.prev, self.steps, self.seg_accepts = prev, 0, len(self.accepts)
        spec = replace(first, token_ids=np.asarray(self.prompt + prev, dtype=np.int32),
                       emitted=len(prev), mode=self.mode, seq_id=f"{first.seq_id}-{self.seg}",
                       sampling=replace(first.sampling, max_new_tokens=(
                           first.sampling.max_new_tokens - len(prev))))
        timeout = self.verifier_timeout_s if self.give_up_at is None else \
            max(1.0, min(self.verifier_timeout_s, self.give_up_at - time.monotonic()))
        return spec, timeout

    def step(self, step: StepOutput) -> None:
        self.steps += 1
        self.out += step.new_token_ids
        if step.accepted is not None:
            self.accepts.append(step.accepted)
        self.on_step(step)

    def end_segment(self) -> None:
        self.cycles += max(0, self.steps - 1)  # the segment's first step was its prefill

    def done(self, r: GenerationResult) -> Outcome:
        if self.pipe is not None:
            self.pipe["hits"] += int(r.extra.get("pipeline_hits", 0))
            self.pipe["misses"] += int(r.extra.get("pipeline_misses", 0))
        # the segment's own count of accepted drafts per cycle: the streamed steps' where every
        # cycle was a step, vLLM's exact one where outputs were merged
        self.accepts[self.seg_accepts:] = list(r.accept_lengths)
        return Outcome(self.prev + r.token_ids, self.accepts, self.cycles + r.cycles,
                       r.finish_reason, self.fallback, r.timings, self.pipe)

    def drafter_failed(self, e: DrafterUnavailable) -> None:
        log.warning("request %s: %s; finishing with plain AR", self.first.seq_id, e)
        self.mode, self.fallback = "ar", True
        self.on_fallback("drafter_to_ar")

    def verifier_failed(self, e: VerifierUnavailable) -> float:
        """Seconds to wait before the resumed segment; re-raises when the resumes are spent."""
        now = time.monotonic()
        self.give_up_at = self.give_up_at or now + self.resume_window_s
        if self.resumed >= self.resumes or now >= self.give_up_at:
            raise e
        self.resumed += 1
        log.warning("request %s: %s; resuming from %d tokens (%d/%d)", self.first.seq_id, e,
                    len(self.out), self.resumed, self.resumes)
        self.on_fallback("verifier_resume")
        return min(0.2 * self.resumed, max(0.0, self.give_up_at - now))


def run_session(segment: Segment, first: DecodeSpec, *, resumes: int, resume_window_s: float,
                verifier_timeout_s: float, fallback: bool = False,
                on_step: Callable[[StepOutput], Any] = lambda step: None,
                on_fallback: Callable[[str], Any] = lambda kind: None,
                ) -> Generator[StepOutput, None, Outcome]:
    """The request's steps, segment after segment, then its Outcome. first: the first
    segment (the whole request: token_ids = the prompt); fallback: the drafter already failed
    (first.mode is then "ar"). on_step: each step, before it is yielded; on_fallback:
    "drafter_to_ar" or "verifier_resume", as each happens. Raises VerifierUnavailable when
    the resumes are spent."""
    s = _Session(first, resumes=resumes, resume_window_s=resume_window_s,
                 verifier_timeout_s=verifier_timeout_s, fallback=fallback, on_step=on_step,
                 on_fallback=on_fallback)
    while True:
        it = segment(*s.next_segment())
        try:
            while True:
                try:
                    step = next(it)
                except StopIteration as stop:
                    return s.done(stop.value)
                except DrafterUnavailable as e:
                    s.drafter_failed(e)
                    break
                except VerifierUnavailable as e:
                    time.sleep(s.verifier_failed(e))
                    break
                s.step(step)
                yield step
        finally:
            it.close()  # releases both caches when the client went away
        s.end_segment()


async def arun_session(segment: AsyncSegment, first: DecodeSpec, *, resumes: int,
                       resume_window_s: float, verifier_timeout_s: float, fallback: bool = False,
                       on_step: Callable[[StepOutput], Any] = lambda step: None,
                       on_fallback: Callable[[str], Any] = lambda kind: None,
                       ) -> AsyncGenerator[tuple[str, Any], None]:
    """`run_session` in the caller's event loop, over async segments (one streaming call
    each, `clients.aremote_segment`): ("step", StepOutput) ... then ("done", Outcome)."""
    s = _Session(first, resumes=resumes, resume_window_s=resume_window_s,
                 verifier_timeout_s=verifier_timeout_s, fallback=fallback, on_step=on_step,
                 on_fallback=on_fallback)
    while True:
        it = segment(*s.next_segment())
        try:
            while True:
                try:
                    try:
                        kind, val = await it.__anext__()
                    except StopAsyncIteration:
                        raise VerifierUnavailable("the segment ended without a result") from None
                except DrafterUnavailable as e:
                    s.drafter_failed(e)
                    break
                except VerifierUnavailable as e:
                    await asyncio.sleep(s.verifier_failed(e))
                    break
                if kind == "done":
                    yield "done", s.done(val)
                    return
                s.step(val)
                yield "step", val
        finally:
            await it.aclose()  # cancels the segment's call when the client went away
        s.end_segment()


def run_segment(target, drafter, spec: DecodeSpec, *, target_client, drafter_client=None,
                detokenize: Optional[Callable[[list[int]], str]] = None, gate=None,
                ) -> Generator[StepOutput, None, GenerationResult]:
    """One segment in this process: `iter_generate(target, drafter, spec...)`, whose result's
    timings are split by what the replicas reported (`split_timings`). target_client: the
    `RemoteTarget` (or a replica's own target) under `target`, whose `calls` hold each call's
    (wait, compute); drafter_client: the `RemoteDrafter` under `drafter` (deer mode), whose
    `server_s` sums them. detokenize: the completion's ids -> text (stop strings). gate: the
    host's `DraftGate` for adaptive-k requests (deer_serve.adaptive)."""
    ids = np.asarray(spec.token_ids).tolist()
    detok: Optional[Callable[[list[int]], str]] = None
    if detokenize is not None:
        full, before = detokenize, ids[len(ids) - spec.emitted:]
        detok = lambda new: full(before + new)  # noqa: E731
    d0 = tuple(drafter_client.server_s) if drafter_client is not None else (0.0, 0.0)
    it = iter_generate(target, drafter, ids, spec.sampling, mode=spec.mode,
                       block_size=spec.block_size, seq_id=spec.seq_id,
                       adaptive_k=spec.adaptive_k, pipeline=spec.pipeline, detokenize=detok,
                       gate=gate_for(gate, spec.sampling.seed))
    try:
        r = yield from it
    finally:
        it.close()
    d1 = drafter_client.server_s if drafter_client is not None else d0
    r.timings = split_timings(r.timings, (d1[0] - d0[0], d1[1] - d0[1]),
                              target_client.calls[1:])
    return r


def split_timings(t: dict, draft_server: Sequence[float], verify_calls: Sequence) -> dict:
    """The engine's timings (seconds; draft and verify as the decode loop saw its calls) with
    each of draft and verify split by what the replicas reported (`server`: wait, compute):
    draft / verify = compute in the replicas, waiting = queued there behind other calls'
    forwards, transport = the rest of the call (network, serialization, Serve). verify_calls:
    the (wait, compute) of each verify after the prefill. A pipelined draft overlaps the verify,
    so its wait in the loop can be shorter than its compute: then the loop's time is split in
    the replica's proportions and transport is 0. The sum of draft, verify, waiting and
    transport is the loop's draft + verify."""
    out = dict(t)
    vw = sum(c[0] for c in verify_calls if c)
    vc = sum(c[1] for c in verify_calls if c)
    waiting = transport = 0.0
    for key, (w, c) in (("draft", tuple(draft_server)), ("verify", (vw, vc))):
        obs = float(t.get(key, 0.0))
        if w + c <= 0:
            continue
        if obs >= w + c:
            out[key], waiting, transport = c, waiting + w, transport + obs - w - c
        else:
            out[key], waiting = obs * c / (w + c), waiting + obs * w / (w + c)
    out["waiting"], out["transport"] = waiting, transport
    return out
