"""The Router: the ingress (OpenAI-compatible HTTP, deployments.http_ingress, and the gRPC
`DeerService`, deployments.grpc_ingress) and the host of each request's decode session.

Per request:  parse (schemas.parse_request, shared by HTTP and gRPC) -> tokenize
(deployments.text, chat templates) -> the decode session --StepOutput--> JSON / SSE chunks /
gRPC messages. Under the segment loops (colocated, engine, vllm) the session runs in the
replica's event loop (one streaming call per segment, no thread); under `loop: router` it runs in
a worker thread (its draft and verify calls block) whose events reach the loop through a queue.

The session (deployments.session) is `deer_serve.engine.iter_generate` in segments, with the
drafter-to-AR fallback and the verifier resume. Where its loop runs is `ServiceOptions.loop`:
`router` (here, over `RemoteTarget` / `RemoteDrafter`, deployments.clients, through the
transport `ServiceOptions.transport` picks), `colocated` (one streaming call per segment to a
Verifier replica that holds its own drafter), `engine` (the same call, run by the replica's
step engine) or `vllm` (the same call, run by the replica's vLLM AsyncLLM with the drafter
inside vLLM, deployments.vllm_loop). No acceptance, sampling or caching here.

Admission: at most `max_pending_requests` requests per Router replica; more get 429 /
RESOURCE_EXHAUSTED with Retry-After. A client that goes away cancels its decode loop (no more
draft or verify calls; both caches released). API keys: deployments.security. Spans and
metrics: deployments.telemetry; the `deer.timings` split: session.split_timings.

The class is plain; `make_ingress` builds its FastAPI app (http_ingress.ROUTES) and applies
`serve.ingress`, and only `deployments.app.build_app` calls `serve.deployment`. The FastAPI app
is made inside the builder, not at module level, so that it is pickled by value with the routes
Serve rewrote for the class (a module-level app would be re-imported unrewritten by replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Generator, Optional, Sequence

import numpy as np
from pydantic import Field

from deer_serve.adaptive import DraftGate
from deer_serve.drafters.lookup import LookupDrafter
from deer_serve.engine import StepOutput
from deer_serve.types import GenerationResult, SamplingParams
from deployments.clients import (DrafterUnavailable, RemoteDrafter, RemoteTarget,
                                 VerifierUnavailable, aremote_segment, close_channels, route_handle)
from deployments.grpc_ingress import GrpcIngress
from deployments.http_ingress import HttpIngress, fastapi_app
from deployments.ingress_core import Slot
from deployments.app import DecodeDefaults, ServiceOptions
from deployments.schemas import (GenerationRequest, RequestError, RequestKind, Usage,
                                 check_prompt, parse_request)
from deployments.security import ApiKeys
from deployments.session import DecodeSpec, Outcome, arun_session, run_segment, run_session
from deployments.telemetry import (CycleSpans, Metrics, TracedDrafter, TracedTarget, Tracing,
                                   replica_info)
from deployments.text import TextStream, prompt_ids

log = logging.getLogger("deer_serve.router")

# loops whose segment is one streaming call to a Verifier replica (the Router's session runs in
# its event loop); `router` runs the loop here, in a worker thread per request
SEGMENT_LOOPS = ("colocated", "engine", "vllm")


# ---- per-request state -------------------------------------------------------------------------
class RouterSettings(ServiceOptions, DecodeDefaults):
    """The Router's settings: AppConfig's `service` section and its `DecodeDefaults` (build_app
    passes them on), and what it resolved."""

    served_model_name: str = Field(description="the only accepted `model` value")
    tokenizer_path: str = Field(description="the target's tokenizer (and chat template)")


@dataclass
class Prepared:
    req: GenerationRequest
    prompt_ids: list[int]
    sampling: SamplingParams
    block_size: int
    adaptive_k: bool = False
    pipeline: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    protocol: str = "http"
    headers: Optional[dict] = None      # W3C trace context to join, if the client sent one
    slot: Optional["Slot"] = None       # the admission slot, released when the decode ends
    trace_id: Optional[str] = None
    spans: Optional[CycleSpans] = None
    streamed: bool = True  # the client reads each step (False: `complete`, only the result)


def _advance_all(gen, put, cancel: threading.Event) -> None:
    """Run the decode generator to its end in this (worker) thread, handing each event to the
    event loop; stop early (closing the generator releases the caches) when cancelled."""
    try:
        while True:
            if cancel.is_set():
                gen.close()
                return
            try:
                step = next(gen)
            except StopIteration as stop:
                put(("done", stop.value))
                return
            put(("step", step))
    except BaseException as e:  # handed to the request's coroutine
        put(("error", e))


# ---- the Router ------------------------------------------------------------------------------
class Router(HttpIngress, GrpcIngress):
    def __init__(self, drafter, verifier, settings: Any):
        from transformers import AutoTokenizer

        self.drafter, self.verifier = drafter, verifier
        self.settings = RouterSettings.model_validate(settings)
        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.tokenizer_path)
        self._pool = ThreadPoolExecutor(self.settings.max_concurrent_decodes,
                                        thread_name_prefix="deer-decode")
        self._target_meta: Optional[dict] = None
        self._drafter_meta: Optional[dict] = None
        self.keys = ApiKeys(self.settings.api_keys, self.settings.api_keys_env)
        self.metrics = Metrics()
        self.tracing = Tracing(self.settings.tracing)
        self._active = 0                  # admitted requests (Slot)
        self.counts = {"cancelled": 0, "resumed": 0, "rejected": 0, "fallbacks": 0}
        # calls answered per replica id, by role (ops_state: which replicas carry the traffic)
        self.replica_calls: dict[str, dict[str, int]] = {"drafter": {}, "verifier": {}}
        self.gate = DraftGate()  # `loop: router`: whether drafting pays, per temperature

    # ---- shared by HTTP and gRPC
    def detokenize(self, ids: Sequence[int]) -> str:  # as `deer-serve generate` decodes
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    async def target_meta(self) -> dict:
        if self._target_meta is None:
            try:
                self._target_meta = await asyncio.wait_for(
                    self.verifier.meta.remote(), min(60.0, self.settings.verifier_timeout_s))
            except Exception as e:
                raise VerifierUnavailable(f"verifier meta failed: {e!r}") from e
        return self.known_target_meta()

    def known_target_meta(self) -> dict:  # called in a decode thread
        """The verifier's meta, which `prepare` fetched before any decode started."""
        if self._target_meta is None:
            raise VerifierUnavailable("verifier meta not fetched")
        return self._target_meta

    # ---- admission and authentication (HTTP and gRPC)
    def admit(self, key: Optional[str], protocol: str) -> Slot:
        """Raises RequestError 401 (bad key) or 429 (too many requests), else a Slot."""
        if not self.keys.check(key):
            self.metrics.error("unauthorized")
            raise RequestError("invalid or missing API key", 401, type="authentication_error",
                               code="invalid_api_key")
        if self._active >= self.settings.max_pending_requests:
            self.counts["rejected"] += 1
            self.metrics.error("overloaded")
            raise RequestError(f"the server is busy ({self._active} requests in progress); "
                               "try again later", 429, type="rate_limit_error",
                               code="overloaded")
        self.metrics.requests.inc(1, tags={"protocol": protocol})
        return Slot(self)

    def drafter_meta(self) -> dict:  # called in a decode thread
        if self._drafter_meta is None:
            try:
                self._drafter_meta = self.drafter.meta.remote().result(
                    timeout_s=self.settings.drafter_timeout_s)
            except Exception as e:
                raise DrafterUnavailable(f"drafter meta failed: {e!r}") from e
        return self._drafter_meta

    async def prepare(self, data: Any, kind: RequestKind) -> Prepared:
        s = self.settings
        req = parse_request(data, kind=kind, served_model=s.served_model_name, limits=s.limits)
        meta = await self.target_meta()
        ids = prompt_ids(self.tokenizer, req)
        check_prompt(ids, vocab_size=int(meta["vocab_size"]), limits=s.limits)
        try:
            sampling = req.sampling_params()
        except ValueError as e:
            raise RequestError(str(e), 400) from None
        return Prepared(req, ids, sampling, req.block_size or s.block_size,
                        s.adaptive_k if req.adaptive_k is None else req.adaptive_k,
                        s.pipeline if req.pipeline is None else req.pipeline)

    def _first(self, p: Prepared, mode: str) -> DecodeSpec:
        """The request's first segment (the whole request)."""
        s = self.settings
        return DecodeSpec(token_ids=np.asarray(p.prompt_ids, dtype=np.int32), emitted=0,
                          sampling=p.sampling, mode=mode, block_size=p.block_size, seq_id=p.id,
                          adaptive_k=p.adaptive_k, pipeline=p.pipeline, lookup=s.lookup,
                          drafter_timeout_s=s.drafter_timeout_s, streamed=p.streamed)

    def _session_options(self) -> dict:
        s = self.settings
        return dict(resumes=s.verifier_resumes, resume_window_s=s.verifier_resume_window_s,
                    verifier_timeout_s=s.verifier_timeout_s, on_step=self._count_step,
                    on_fallback=self._fallback)

    async def _segments(self, p: Prepared) -> AsyncGenerator[tuple[str, Any], None]:
        """`loop: colocated` / `engine` / `vllm`: the request's session in this event loop, each
        segment one streaming call to a Verifier replica (`clients.aremote_segment`), which
        drafts itself (loop vllm: the drafter is inside vLLM)."""
        verifier_h = self.call_handle(self.verifier, p.id)

        def segment(spec: DecodeSpec, timeout: float):
            return aremote_segment(verifier_h, spec)

        try:
            async with contextlib.aclosing(arun_session(segment, self._first(p, p.req.mode),
                                                        **self._session_options())) as it:
                async for kind, val in it:
                    yield kind, val
        finally:
            close_channels(verifier_h)

    def decode(self, p: Prepared) -> Generator[StepOutput, None, Outcome]:
        """`loop: router`: the request's decode session (runs in a worker thread), its loop here
        over the Verifier and Drafter deployments (`_segment`, deployments.session)."""
        s = self.settings
        drafter: Any = None  # RemoteDrafter, or the LookupDrafter around it
        remote_d: Optional[RemoteDrafter] = None
        mode, fallback = p.req.mode, False
        verifier_h = self.call_handle(self.verifier, p.id)
        if mode == "deer":
            try:
                drafter = remote_d = RemoteDrafter(self.call_handle(self.drafter, p.id),
                                                   self.drafter_meta(), s.drafter_timeout_s)
                if s.lookup:
                    drafter = LookupDrafter(drafter,
                                            vocab_size=int(self.known_target_meta()["vocab_size"]))
            except DrafterUnavailable as e:
                log.warning("request %s: %s; decoding plain AR", p.id, e)
                mode, fallback = "ar", True
                self._fallback("drafter_to_ar")

        def segment(spec: DecodeSpec, timeout: float):
            return self._segment(p, spec, timeout, verifier_h, drafter, remote_d)

        try:
            o = yield from run_session(segment, self._first(p, mode), fallback=fallback,
                                       **self._session_options())
        finally:
            close_channels(verifier_h, remote_d)
        return o

    def _segment(self, p: Prepared, spec: DecodeSpec, timeout: float, verifier_h, drafter,
                 remote_d: Optional[RemoteDrafter]) -> Generator[StepOutput, None, GenerationResult]:
        """`loop: router`: one segment here, over the Verifier and Drafter deployments; with
        tracing, each call in a span and each step closing its cycle span."""
        spans = p.spans
        remote_t = RemoteTarget(verifier_h, self.known_target_meta(), timeout,
                                argmax_only=spec.sampling.greedy)
        target: Any = remote_t
        d = drafter if spec.mode == "deer" else None
        if spans is not None:
            target = TracedTarget(target, spans)
            d = TracedDrafter(d, spans) if d is not None else None
        it = run_segment(target, d, spec, target_client=remote_t, gate=self.gate,
                         drafter_client=remote_d if d is not None else None,
                         detokenize=self.detokenize)
        try:
            while True:
                try:
                    step = next(it)
                except StopIteration as stop:
                    return stop.value
                if spans is not None:
                    spans.end_cycle(step, d.last_k if d is not None else 0)
                    if d is not None:
                        d.last_k = None
                yield step
        finally:
            it.close()
            if spans is not None:
                spans.close()

    def call_handle(self, handle, request_id: str):
        """The handle one request's draft and verify calls go through (`route_handle`)."""
        return route_handle(handle, self.settings.transport,
                            request_id if self.settings.affinity else None)

    def _count_replica(self, role: str, rid: str) -> None:  # from decode threads: approximate
        calls = self.replica_calls[role]
        calls[rid] = calls.get(rid, 0) + 1

    def _count_step(self, step: StepOutput) -> None:
        if step.accepted is not None:
            self.metrics.accepted.observe(step.accepted)
        self.metrics.tokens.inc(len(step.new_token_ids))

    def _fallback(self, kind: str) -> None:
        self.metrics.fallback(kind)
        self.counts["fallbacks" if kind == "drafter_to_ar" else "resumed"] += 1

    async def _threaded(self, p: Prepared) -> AsyncGenerator[tuple[str, Any], None]:
        """`loop: router`: the session in a worker thread (its draft and verify calls block),
        each event handed to this event loop; closing this stops the thread's loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone
                cancel.set()

        loop.run_in_executor(self._pool, _advance_all, self.decode(p), put, cancel)
        try:
            while True:
                kind, val = await queue.get()
                if kind == "error":
                    raise val
                yield kind, val
                if kind == "done":
                    return
        finally:
            cancel.set()  # a client that went away stops its decode loop

    async def events(self, p: Prepared) -> AsyncGenerator[tuple[str, Any], None]:
        """("step", StepOutput)... then ("done", Outcome); raises what the decode raised. The
        segment loops (colocated, engine, vllm) run the session in this event loop; `loop:
        router` in a worker thread."""
        span = self.tracing.start_request(p.headers, {
            "deer.protocol": p.protocol, "deer.mode": p.req.mode,
            "deer.prompt_tokens": len(p.prompt_ids), "deer.max_tokens": p.sampling.max_new_tokens,
            "deer.block_size": p.block_size, "deer.request_id": p.id})
        p.trace_id = Tracing.trace_id(span)
        p.spans = self.tracing.spans_of(span)
        p.spans.metrics = self.metrics
        p.spans.on_replica = self._count_replica
        t0, first, state = time.perf_counter(), True, "cancelled"
        events = self._segments(p) if self.settings.loop in SEGMENT_LOOPS else self._threaded(p)
        try:
            async with contextlib.aclosing(events):
                async for kind, val in events:
                    if first and kind == "step" and val.new_token_ids:
                        first = False
                        self.metrics.ttft_s.observe(time.perf_counter() - t0)
                    if kind == "done":
                        state = "done"
                        span.set_attributes({"deer.finish_reason": val.finish_reason or "",
                                             "deer.cycles": val.cycles,
                                             "deer.fallback": val.fallback,
                                             "deer.completion_tokens": len(val.token_ids)})
                        self.metrics.request_s.observe(time.perf_counter() - t0)
                        if val.pipeline:
                            self.metrics.pipeline_hits.inc(val.pipeline["hits"])
                            self.metrics.pipeline_misses.inc(val.pipeline["misses"])
                    yield kind, val
                    if kind == "done":
                        return
        except Exception as e:  # what the decode raised (not the client going away)
            if state != "done":
                state = "error"
                span.record_exception(e)
            raise
        finally:
            if state == "cancelled":
                self._count_cancelled(f"request {p.id}: decode cancelled")
            span.set_attribute("deer.outcome", state)
            span.end()
            if p.slot is not None:
                p.slot.release()

    def _count_cancelled(self, what: str) -> None:
        self.counts["cancelled"] += 1
        self.metrics.error("cancelled")
        log.info("the client went away: %s", what)

    async def complete(self, p: Prepared) -> tuple[Outcome, str]:
        p.streamed = False  # a Verifier that decodes the segment replies once, at its end
        done = None
        async for kind, val in self.events(p):  # to its end: the slot is released there
            if kind == "done":
                done = val
        if done is None:
            raise RuntimeError("decode ended without a result")
        return done, TextStream(self.detokenize, p.sampling.stop).push(done.token_ids, True)

    async def stream(self, p: Prepared) -> AsyncIterator[tuple[str, list[int], Optional[Outcome]]]:
        """(text delta, new token ids, Outcome on the last item)."""
        ts = TextStream(self.detokenize, p.sampling.stop)
        async with contextlib.aclosing(self.events(p)) as events:  # closed now, not at GC
            async for kind, val in events:
                if kind == "step":
                    delta = ts.push(val.new_token_ids, final=False)
                    if delta or val.new_token_ids:
                        yield delta, list(val.new_token_ids), None
                else:
                    yield ts.push([], final=True), [], val

    def usage(self, p: Prepared, o: Outcome) -> Usage:
        n_in, n_out = len(p.prompt_ids), len(o.token_ids)
        return Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)

    def _count_error(self, e: Exception, status: int) -> None:
        if status in (401, 429):
            return  # counted by admit()
        self.metrics.error({503: "verifier_unavailable", 500: "internal"}.get(
            status, "invalid_request"))

    async def ops_state(self) -> dict:
        """Admission and fault counters of this replica (for tests and operators)."""
        return {"active": self._active, **self.counts,
                "replica_calls": {r: dict(c) for r, c in self.replica_calls.items()}}

    async def recent_spans(self, trace_id: Optional[str] = None) -> list[dict]:
        """Finished spans kept by the `memory` trace exporter (tests, debugging)."""
        return self.tracing.recent(trace_id)

    async def info(self) -> dict:
        """Where each part runs (for tests and operators)."""
        return {"router": replica_info("router", self.settings.tokenizer_path, "cpu"),
                "drafter": await self.drafter.info.remote(),
                "verifier": await self.verifier.info.remote()}


class InProcess:
    """An object in the caller's process called as the Router calls a Serve handle (`service.
    ingress: verifier`): `await h.meta.remote()`, and `h.options(stream=True).decode.remote(spec)`
    as an async iterator with `cancel()`. No hop, no serialization: the objects are shared."""

    def __init__(self, obj):
        self.obj = obj

    def options(self, **kw) -> "InProcess":
        return self

    def __getattr__(self, name: str) -> "_InProcessMethod":
        if name.startswith("_"):
            raise AttributeError(name)
        return _InProcessMethod(getattr(self.obj, name))


class _InProcessMethod:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        if inspect.isasyncgenfunction(self.fn):
            return _InProcessStream(self.fn(*args, **kwargs))

        async def call():
            return self.fn(*args, **kwargs)
        return call()


class _InProcessStream:
    def __init__(self, agen):
        self.agen = agen

    def __aiter__(self):
        return self.agen

    def cancel(self) -> None:
        """As a Serve stream's: the generator closes (a vLLM request is aborted there)."""
        async def close():
            try:
                await self.agen.aclose()
            except Exception:  # noqa: BLE001 - logged, as Serve would
                log.exception("closing an in-process decode stream")
        asyncio.ensure_future(close())


class VerifierIngress(Router):
    """`service.ingress: verifier` (loop vllm): the Router's work inside a Verifier replica.
    HTTP and gRPC requests enter the replica that holds the vLLM engine; each request's segment
    is the replica's own `Verifier.decode`, called in this event loop (`InProcess`), so a request
    costs one Serve hop (the proxy's) instead of two, and its streamed items none. A request
    whose replica dies ends with it: there is no other replica to resume on from here."""

    def __init__(self, settings: Any, verifier_args: dict):
        from deployments.verifier import Verifier

        v = InProcess(Verifier(**verifier_args))
        super().__init__(v, v, settings)

    def call_handle(self, handle, request_id: str):
        return handle

    def engine_stats(self) -> dict:
        """The replica's vLLM loop counters (as `Verifier.engine_stats`; tests, operators)."""
        return self.verifier.obj.engine_stats()


def make_ingress(cls=None):
    """`serve.ingress(FastAPI app with http_ingress.ROUTES)(cls)`: the Router class Serve
    deploys."""
    from ray import serve

    cls = cls or Router
    return serve.ingress(fastapi_app(cls))(cls)
