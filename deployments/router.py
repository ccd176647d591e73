"""The Router: the ingress (OpenAI-compatible HTTP via FastAPI, and the gRPC `DeerService`).

It owns each request's decode loop, and the loop is `deer_serve.engine.iter_generate` itself:
run in a worker thread over two proxies, `RemoteTarget` (deployments.verifier) and
`RemoteDrafter` (deployments.drafter), that implement the core's `TargetBackend` / `Drafter`
protocols with calls to the Verifier and Drafter deployments
(`handle.method.remote(...).result()`). No acceptance, sampling or caching here.

Per request:  parse (schemas.parse_request, shared by HTTP and gRPC) -> tokenize -> decode
thread --StepOutput--> asyncio queue -> JSON / SSE chunks / gRPC messages.

When the drafter fails or times out, the request goes on as plain AR decoding through the
verifier from the tokens emitted so far, and its `deer` stats say `fallback: true`. When a
verifier call fails (a dead replica), the request is resumed from its token ids (prompt +
emitted tokens; Serve routes the retry to a live replica) up to `verifier_resumes` times within
`verifier_resume_window_s`, else it ends with 503 / UNAVAILABLE. Greedy output stays the
target's plain AR output either way. Every remote wait has a timeout, so nothing hangs.

Admission: at most `max_pending_requests` requests per Router replica; more get 429 /
RESOURCE_EXHAUSTED with Retry-After. A client that goes away cancels its decode loop (no more
draft or verify calls; both caches released). API keys: deployments.security. Spans and
metrics: deployments.telemetry.

The class is plain; `make_ingress` builds its FastAPI app (the routes in `ROUTES`) and applies
`serve.ingress`, and only `deployments.app.build_app` calls `serve.deployment`. The FastAPI app
is made inside the builder, not at module level, so that it is pickled by value with the routes
Serve rewrote for the class (a module-level app would be re-imported unrewritten by replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, AsyncGenerator, AsyncIterator, Generator, Optional, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from deer_serve.drafters.lookup import LookupDrafter
from deer_serve.engine import StepOutput, iter_generate
from deer_serve.types import GenerationResult, SamplingParams
from deployments.drafter import DrafterUnavailable, RemoteDrafter
from deployments.schemas import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    ChatMessageOut, CompletionChoice, CompletionChunk, CompletionResponse, DeerStats,
    GenerationRequest, Limits, ModelCard, ModelList, RequestError, RequestKind, ServiceOptions,
    Usage, _id, _now, check_prompt, parse_request)
from deployments.security import ApiKeys, grpc_key, http_key
from deployments.telemetry import CycleSpans, Metrics, TracedDrafter, TracedTarget, Tracing
from deployments.verifier import (RemoteTarget, VerifierUnavailable, close_channels, route_handle,
                                  split_timings)

log = logging.getLogger("deer_serve.router")

# ---- per-request state -------------------------------------------------------------------------
class RouterSettings(ServiceOptions):
    served_model_name: str = Field(description="the only accepted `model` value")
    tokenizer_path: str = Field(description="the target's tokenizer (and chat template)")
    block_size: int = Field(16, ge=1, le=64, description="default draft tokens per cycle")
    adaptive_k: bool = Field(False, description="default of the request field adaptive_k")
    limits: Limits = Field(default_factory=Limits)
    drafter_timeout_s: float = Field(30.0, gt=0, description="slower drafter calls -> AR fallback")
    verifier_timeout_s: float = Field(300.0, gt=0, description="slower verifier calls -> 503")
    max_concurrent_decodes: int = Field(32, ge=1, description="decode loops (threads) at once")


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


class Slot:
    """One admitted request (bounded by `max_pending_requests`); release() is idempotent."""

    def __init__(self, router: "Router"):
        self.router, self.held = router, True
        router._active += 1
        router.metrics.inflight.set(router._active)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.router._active -= 1
            self.router.metrics.inflight.set(self.router._active)


@dataclass
class Outcome:
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


class TextStream:
    """Token ids -> text deltas. Holds back an incomplete UTF-8 character and any tail that may
    begin a stop string, so the streamed text always concatenates to the final text."""

    def __init__(self, decode, stops: Sequence[str]):
        self.decode, self.stops = decode, tuple(stops)
        self.ids: list[int] = []
        self.sent = 0

    def full_text(self) -> str:
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[:min(cuts)] if cuts else text

    def push(self, ids: Sequence[int], final: bool) -> str:
        self.ids.extend(ids)
        text = self.full_text()
        if not final:
            text = text.rstrip("\ufffd")
            hold = max((n for s in self.stops for n in range(1, len(s))
                        if text.endswith(s[:n])), default=0)
            text = text[:len(text) - hold]
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta


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


# ---- the ingress -------------------------------------------------------------------------------
class Router:
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
        if req.messages is not None:
            ids = self.tokenizer.encode(self.render_chat(req), add_special_tokens=False)
        elif isinstance(req.prompt, str):  # as `deer-serve generate` tokenizes
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=False)
        else:
            ids = list(req.prompt or ())  # (parse_request requires a prompt or messages)
        check_prompt(ids, vocab_size=int(meta["vocab_size"]), limits=s.limits)
        try:
            sampling = req.sampling_params()
        except ValueError as e:
            raise RequestError(str(e), 400) from None
        return Prepared(req, ids, sampling, req.block_size or s.block_size,
                        s.adaptive_k if req.adaptive_k is None else req.adaptive_k,
                        s.pipeline if req.pipeline is None else req.pipeline)

    def render_chat(self, req: GenerationRequest) -> str:
        msgs = [{"role": m.role, "content": m.text} for m in req.messages or ()]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=True)
        # no template (e.g. a base code model): a plain transcript ending in the assistant's turn
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"

    def decode(self, p: Prepared) -> Generator[StepOutput, None, Outcome]:
        """The request's decode loop (runs in a worker thread): the engine's loop, in segments.
        A segment ends at a drafter failure (the rest is plain AR) or a verifier failure (the
        rest is resumed, bounded); each new segment starts from prompt + the tokens emitted so
        far, so greedy output is the target's plain AR output whatever happens."""
        s = self.settings
        drafter: Any = None  # RemoteDrafter, or the LookupDrafter around it
        mode, fallback = p.req.mode, False
        verifier_h = self.call_handle(self.verifier, p.id)
        if mode == "deer":
            try:
                drafter = RemoteDrafter(self.call_handle(self.drafter, p.id), self.drafter_meta(),
                                        s.drafter_timeout_s)
                if s.lookup and s.loop == "router":
                    drafter = LookupDrafter(drafter,
                                            vocab_size=int(self.known_target_meta()["vocab_size"]))
            except DrafterUnavailable as e:
                log.warning("request %s: %s; decoding plain AR", p.id, e)
                mode, fallback = "ar", True
                self._fallback("drafter_to_ar")
        try:
            return (yield from self._decode(p, mode, drafter, fallback, verifier_h))
        finally:
            close_channels(verifier_h, drafter)

    def _decode(self, p: Prepared, mode: str, drafter, fallback: bool,
                verifier_h) -> Generator[StepOutput, None, Outcome]:
        s, spans = self.settings, p.spans
        out: list[int] = []
        accepts: list[int] = []
        cycles, resumes, give_up_at = 0, 0, None
        pipe = {"hits": 0, "misses": 0} if p.pipeline and mode == "deer" else None
        for seg in range(s.verifier_resumes + 2):  # (+1 drafter fallback)
            prev = list(out)
            rest = replace(p.sampling, max_new_tokens=p.sampling.max_new_tokens - len(prev))
            timeout = s.verifier_timeout_s if give_up_at is None else \
                max(1.0, min(s.verifier_timeout_s, give_up_at - time.monotonic()))
            remote_t = RemoteTarget(verifier_h, self.known_target_meta(), timeout,
                                    argmax_only=s.greedy_argmax and p.sampling.greedy)
            remote_d = getattr(drafter, "inner", drafter)
            target: Any = remote_t  # (a TracedTarget around it when tracing)
            d_server0 = tuple(getattr(remote_d, "server_s", (0.0, 0.0)))  # this segment's own
            d = drafter if mode == "deer" else None
            if s.loop == "colocated":
                d = None  # the Verifier replica drafts (and falls back to AR) itself
                it = self._verifier_loop(verifier_h, p, prev, rest,
                                         "deer" if drafter is not None and mode == "deer"
                                         else "ar", f"{p.id}-{seg}")
            else:
                if spans is not None:
                    target = TracedTarget(target, spans)
                    d = TracedDrafter(d, spans) if d is not None else None

                def detokenize(ids: list[int], prev: list[int] = prev) -> str:
                    return self.detokenize(prev + ids)

                it = iter_generate(target, d, p.prompt_ids + prev, rest, mode=mode,
                                   block_size=p.block_size, seq_id=f"{p.id}-{seg}",
                                   adaptive_k=p.adaptive_k, pipeline=p.pipeline,
                                   detokenize=detokenize)
            steps = 0
            try:
                while True:
                    try:
                        step = next(it)
                    except StopIteration as stop:
                        r = stop.value
                        self._pipeline_counts(r, pipe)
                        timings = r.timings
                        if s.loop == "router":  # (the Verifier's loop splits its own)
                            ds = getattr(remote_d, "server_s", (0.0, 0.0)) if d is not None \
                                else d_server0
                            timings = split_timings(timings, (ds[0] - d_server0[0],
                                                              ds[1] - d_server0[1]),
                                                    remote_t.calls[1:])
                        return Outcome(prev + r.token_ids, accepts, cycles + r.cycles,
                                       r.finish_reason, fallback, timings, pipe)
                    except DrafterUnavailable as e:
                        log.warning("request %s: %s; finishing with plain AR", p.id, e)
                        mode, fallback = "ar", True
                        self._fallback("drafter_to_ar")
                        break
                    except VerifierUnavailable as e:
                        now = time.monotonic()
                        give_up_at = give_up_at or now + s.verifier_resume_window_s
                        if resumes >= s.verifier_resumes or now >= give_up_at:
                            raise
                        resumes += 1
                        log.warning("request %s: %s; resuming from %d tokens (%d/%d)", p.id, e,
                                    len(out), resumes, s.verifier_resumes)
                        self._fallback("verifier_resume")
                        self.counts["resumed"] += 1
                        time.sleep(min(0.2 * resumes, max(0.0, give_up_at - now)))
                        break
                    steps += 1
                    out += step.new_token_ids
                    if step.accepted is not None:
                        accepts.append(step.accepted)
                        self.metrics.accepted.observe(step.accepted)
                    self.metrics.tokens.inc(len(step.new_token_ids))
                    if spans is not None:
                        spans.end_cycle(step, d.last_k if d is not None else 0)
                        if d is not None:
                            d.last_k = None
                    yield step
            finally:
                it.close()  # releases both caches when the client went away
                if spans is not None:
                    spans.close()
            cycles += max(0, steps - 1)  # the segment's first step was its prefill
        raise VerifierUnavailable("the request was resumed too many times")

    def _verifier_loop(self, handle, p: Prepared, prev: list[int], sampling: SamplingParams,
                       mode: str, seq_id: str) -> Generator[StepOutput, None, GenerationResult]:
        """`loop: colocated`: the segment (from prompt + prev) as one streaming call to a
        Verifier replica (`Verifier.decode`), which drafts with its own drafter. Yields its
        StepOutputs and returns its result; raises DrafterUnavailable when the drafter failed
        there and VerifierUnavailable when the stream failed, which `decode` handles as for its
        own loop."""
        s = self.settings
        stream = handle.options(stream=True).decode.remote(
            np.asarray(p.prompt_ids + prev, dtype=np.int32), sampling, mode, p.block_size, seq_id,
            s.drafter_timeout_s, p.adaptive_k, np.asarray(prev, dtype=np.int32), s.lookup,
            p.pipeline)
        try:
            for batch in stream:  # the events since the last batch (Verifier.decode)
                for kind, val in batch:
                    if kind == "step":
                        yield val
                    elif kind == "drafter_unavailable":
                        raise DrafterUnavailable(val)
                    else:
                        return GenerationResult(**val)
        except DrafterUnavailable:
            raise
        except Exception as e:
            raise VerifierUnavailable(f"verifier decode failed: {e!r}") from e
        finally:
            try:
                stream.cancel()  # the client went away or the loop ended: stop the remote loop
            except Exception:  # noqa: BLE001 - best effort
                pass
        raise VerifierUnavailable("the verifier's decode stream ended without a result")

    def call_handle(self, handle, request_id: str):
        """The handle one request's draft and verify calls go through (`route_handle`)."""
        return route_handle(handle, self.settings.transport,
                            request_id if self.settings.affinity else None)

    def _count_replica(self, role: str, rid: str) -> None:  # from decode threads: approximate
        calls = self.replica_calls[role]
        calls[rid] = calls.get(rid, 0) + 1

    def _fallback(self, kind: str) -> None:
        self.metrics.fallback(kind)
        if kind == "drafter_to_ar":
            self.counts["fallbacks"] += 1

    def _pipeline_counts(self, r, pipe: Optional[dict]) -> None:
        extra = getattr(r, "extra", None) or {}
        hits, misses = int(extra.get("pipeline_hits", 0)), int(extra.get("pipeline_misses", 0))
        if pipe is not None:
            pipe["hits"] += hits
            pipe["misses"] += misses
        if hits:
            self.metrics.pipeline_hits.inc(hits)
        if misses:
            self.metrics.pipeline_misses.inc(misses)

    async def events(self, p: Prepared) -> AsyncGenerator[tuple[str, Any], None]:
        """("step", StepOutput)... then ("done", Outcome); raises what the decode raised."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        span = self.tracing.start_request(p.headers, {
            "deer.protocol": p.protocol, "deer.mode": p.req.mode,
            "deer.prompt_tokens": len(p.prompt_ids), "deer.max_tokens": p.sampling.max_new_tokens,
            "deer.block_size": p.block_size, "deer.request_id": p.id})
        p.trace_id = Tracing.trace_id(span)
        p.spans = self.tracing.spans_of(span)
        p.spans.metrics = self.metrics
        p.spans.on_replica = self._count_replica
        t0, first, state = time.perf_counter(), True, "cancelled"

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
                    state = "error"
                    raise val
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
                yield kind, val
                if kind == "done":
                    return
        except BaseException as e:
            if state == "error":
                span.record_exception(e)
            raise
        finally:
            cancel.set()  # a client that went away stops its decode loop
            if state == "cancelled":
                self.counts["cancelled"] += 1
                self.metrics.error("cancelled")
                log.info("request %s: the client went away; decode cancelled", p.id)
            span.set_attribute("deer.outcome", state)
            span.end()
            if p.slot is not None:
                p.slot.release()

    async def complete(self, p: Prepared) -> tuple[Outcome, str]:
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

    # ---- HTTP
    async def _read(self, request: Request, kind: RequestKind) -> Prepared:
        limit = self.settings.limits.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:  # before reading it
            raise RequestError(f"the body is larger than {limit} bytes", 413,
                               code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():  # chunked bodies have no content-length
            raw += chunk
            if len(raw) > limit:
                raise RequestError(f"the body is larger than {limit} bytes", 413,
                                   code="request_too_large")
        try:
            data = json.loads(bytes(raw))  # JSON only: nothing a client sends is unpickled
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise RequestError(f"the body is not valid JSON: {str(e)[:200]}", 400,
                               code="invalid_json") from None
        p = await self.prepare(data, kind)
        p.headers = {k: v for k, v in request.headers.items()
                     if k in ("traceparent", "tracestate")} or None
        return p

    async def _openai(self, request: Request, kind: RequestKind):
        try:
            slot = self.admit(http_key(request.headers), "http")
        except RequestError as e:
            return self._http_error(e)
        try:
            p = await self._read(request, kind)
            p.slot = slot
        except Exception as e:
            slot.release()
            return self._http_error(e)
        name = self.settings.served_model_name
        if p.req.stream:
            # wait for the first tokens before answering 200: a request that cannot start
            # (verifier down, overload) gets a real status code, not an error event
            gen = self.stream(p)
            try:
                first = await gen.__anext__()
            except Exception as e:
                return self._http_error(e)
            headers = {"x-trace-id": p.trace_id} if p.trace_id else None
            return StreamingResponse(self._sse(p, kind, gen, first), headers=headers,
                                     media_type="text/event-stream")
        try:
            o, text = await self.complete(p)
        except Exception as e:
            return self._http_error(e)
        resp: BaseModel
        if kind == "chat":
            resp = ChatCompletionResponse(model=name, choices=[ChatChoice(
                message=ChatMessageOut(content=text), finish_reason=o.finish_reason,
                token_ids=o.token_ids)], usage=self.usage(p, o), deer=o.stats())
        else:
            resp = CompletionResponse(model=name, choices=[CompletionChoice(
                text=text, finish_reason=o.finish_reason, token_ids=o.token_ids)],
                usage=self.usage(p, o), deer=o.stats())
        return JSONResponse(resp.model_dump(),
                            headers={"x-trace-id": p.trace_id} if p.trace_id else None)

    def _http_error(self, e: Exception) -> JSONResponse:
        status, body = _error_body(e)
        self._count_error(e, status)
        headers = {}
        if status in (429, 503):
            headers["retry-after"] = str(self.settings.retry_after_s)
        if status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(body, status_code=status, headers=headers or None)

    def _count_error(self, e: Exception, status: int) -> None:
        if status in (401, 429):
            return  # counted by admit()
        self.metrics.error({503: "verifier_unavailable", 500: "internal"}.get(
            status, "invalid_request"))

    async def _sse(self, p: Prepared, kind: str, gen, first) -> AsyncIterator[str]:
        name, rid, created = self.settings.served_model_name, _id(
            "chatcmpl" if kind == "chat" else "cmpl"), _now()

        def chunk(text: Optional[str], ids, finish=None, deer=None, role=None, usage=None,
                  choices=True) -> str:
            ch: list[BaseModel]
            c: BaseModel
            if kind == "chat":
                ch = [ChatChunkChoice(delta=ChatDelta(role=role, content=text), token_ids=ids,
                                      finish_reason=finish)] if choices else []
                c = ChatCompletionChunk(id=rid, created=created, model=name, choices=ch,
                                        deer=deer, usage=usage)
            else:
                ch = [CompletionChoice(text=text or "", token_ids=ids, finish_reason=finish)] \
                    if choices else []
                c = CompletionChunk(id=rid, created=created, model=name, choices=ch, deer=deer,
                                    usage=usage)
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        async def items():
            yield first
            async for item in gen:
                yield item

        try:
            if kind == "chat":
                yield chunk("", [], role="assistant")
            async for delta, ids, o in items():
                if o is None:
                    yield chunk(delta, ids)
                else:
                    yield chunk(delta, ids, finish=o.finish_reason, deer=o.stats())
                    if p.req.stream_options and p.req.stream_options.include_usage:
                        yield chunk(None, [], usage=self.usage(p, o), choices=False)
        except Exception as e:
            # mid-stream the status line is gone: the error object (with its code, e.g.
            # verifier_unavailable = retriable) is the last event
            status, body = _error_body(e)
            self._count_error(e, status)
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            await gen.aclose()
        yield "data: [DONE]\n\n"

    async def completions(self, request: Request):
        return await self._openai(request, "completions")

    async def chat_completions(self, request: Request):
        return await self._openai(request, "chat")

    async def models(self, request: Request):
        if not self.keys.check(http_key(request.headers)):
            return self._http_error(RequestError("invalid or missing API key", 401,
                                                 type="authentication_error",
                                                 code="invalid_api_key"))
        return ModelList(data=[ModelCard(id=self.settings.served_model_name)]).model_dump()

    async def healthz(self):
        out, ok = {}, True
        for name, h in (("verifier", self.verifier), ("drafter", self.drafter)):
            try:
                out[name] = await asyncio.wait_for(h.health.remote(), 10.0)
            except Exception as e:
                out[name] = {"ok": False, "error": repr(e)}
                ok = ok and name != "verifier"  # without a drafter we still serve (plain AR)
        body = {"status": "ok" if ok else "unavailable", **out}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def ops_state(self) -> dict:
        """Admission and fault counters of this replica (for tests and operators)."""
        return {"active": self._active, **self.counts,
                "replica_calls": {r: dict(c) for r, c in self.replica_calls.items()}}

    async def recent_spans(self, trace_id: Optional[str] = None) -> list[dict]:
        """Finished spans kept by the `memory` trace exporter (tests, debugging)."""
        return self.tracing.recent(trace_id)

    async def info(self) -> dict:
        """Where each part runs (for tests and operators)."""
        from deployments.verifier import replica_info

        return {"router": replica_info("router", self.settings.tokenizer_path, "cpu"),
                "drafter": await self.drafter.info.remote(),
                "verifier": await self.verifier.info.remote()}

    # ---- gRPC (Serve's gRPC proxy calls these by method name)
    async def Generate(self, request, grpc_context=None):
        from deer_serve.protos import deer_pb2

        try:
            p = await self._grpc_prepare(request, grpc_context)
            o, text = await self.complete(p)
        except Exception as e:
            self._grpc_fail(grpc_context, e)
            return deer_pb2.GenerateResponse()
        return deer_pb2.GenerateResponse(text=text, token_ids=o.token_ids,
                                         finish_reason=o.finish_reason, deer=_pb_stats(o))

    async def GenerateStream(self, request, grpc_context=None):
        from deer_serve.protos import deer_pb2

        try:
            p = await self._grpc_prepare(request, grpc_context)
            async with contextlib.aclosing(self.stream(p)) as chunks:  # a cancel closes it now
                async for delta, ids, o in chunks:
                    if o is None:
                        yield deer_pb2.GenerateChunk(text=delta, token_ids=ids)
                    else:
                        yield deer_pb2.GenerateChunk(text=delta, token_ids=ids,
                                                     finish_reason=o.finish_reason,
                                                     deer=_pb_stats(o))
        except Exception as e:
            # a streaming method's status only reaches the proxy with a yielded message or an
            # exception; Serve keeps the code set on grpc_context when we raise
            self._grpc_fail(grpc_context, e)
            raise

    async def _grpc_prepare(self, request, ctx) -> Prepared:
        md = None
        if ctx is not None and hasattr(ctx, "invocation_metadata"):
            md = ctx.invocation_metadata()
        slot = self.admit(grpc_key(md), "grpc")
        try:
            if request.ByteSize() > self.settings.limits.max_body_bytes:
                raise RequestError(f"the request is larger than "
                                   f"{self.settings.limits.max_body_bytes} bytes", 413,
                                   code="request_too_large")
            p = await self.prepare(_proto_fields(request), "grpc")
        except BaseException:
            slot.release()
            raise
        p.protocol, p.slot = "grpc", slot
        p.headers = {k: v for k, v in (md or ()) if k in ("traceparent", "tracestate")} or None
        return p

    def _grpc_fail(self, ctx, e: Exception) -> None:
        status = _status_of(e)
        self._count_error(e, status)
        if ctx is not None and status in (429, 503) and hasattr(ctx, "set_trailing_metadata"):
            ctx.set_trailing_metadata([("retry-after", str(self.settings.retry_after_s))])
        _grpc_fail(ctx, e)

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1.Health/Check: SERVING while the verifier answers."""
        from grpc_health.v1 import health_pb2

        try:
            await asyncio.wait_for(self.verifier.health.remote(), 10.0)
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


# ---- errors --------------------------------------------------------------------------------------
def _error_body(e: Exception) -> tuple[int, dict]:
    if isinstance(e, RequestError):
        return e.status, e.body()
    if isinstance(e, VerifierUnavailable):
        log.error("verifier unavailable: %s", e)
        return 503, RequestError("the verifier is unavailable; try again later", 503,
                                 type="service_unavailable", code="verifier_unavailable").body()
    log.exception("internal error", exc_info=e)
    return 500, RequestError("internal server error", 500, type="server_error").body()


def _status_of(e: Exception) -> int:
    if isinstance(e, RequestError):
        return e.status
    return 503 if isinstance(e, VerifierUnavailable) else 500


def _grpc_fail(ctx, e: Exception) -> None:
    import grpc

    if isinstance(e, RequestError):
        code = {401: grpc.StatusCode.UNAUTHENTICATED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
                503: grpc.StatusCode.UNAVAILABLE}.get(e.status, grpc.StatusCode.INVALID_ARGUMENT)
        msg = e.message
    elif isinstance(e, VerifierUnavailable):
        code, msg = grpc.StatusCode.UNAVAILABLE, "the verifier is unavailable"
    else:
        log.exception("internal error", exc_info=e)
        code, msg = grpc.StatusCode.INTERNAL, "internal server error"
    if ctx is None:  # called through a handle, not the gRPC proxy
        raise e
    ctx.set_code(code)
    ctx.set_details(msg)


def _proto_fields(msg) -> dict:
    """The fields a proto message has SET (proto3 `optional` keeps 0 apart from unset)."""
    return {f.name: (v if isinstance(v, (bool, int, float, str)) else list(v))
            for f, v in msg.ListFields()}


def _pb_stats(o: Outcome):
    from deer_serve.protos import deer_pb2

    s = o.stats()
    return deer_pb2.DeerStats(accept_lengths=s.accept_lengths, mean_accepted=s.mean_accepted,
                              cycles=s.cycles, fallback=s.fallback)


async def _http_error(request: Request, exc: StarletteHTTPException):
    """Unknown paths and methods in OpenAI's error shape too."""
    return JSONResponse(RequestError(str(exc.detail), exc.status_code,
                                     code="not_found" if exc.status_code == 404 else None).body(),
                        status_code=exc.status_code)


# method, path, Router method name
ROUTES = [("POST", "/v1/completions", "completions"),
          ("POST", "/v1/chat/completions", "chat_completions"),
          ("GET", "/v1/models", "models"),
          ("GET", "/healthz", "healthz")]


def make_ingress(cls=None):
    """`serve.ingress(FastAPI app with ROUTES)(cls)`: the Router class Serve deploys."""
    from ray import serve

    cls = cls or Router
    app = FastAPI(title="deer-serve", description="DEER speculative decoding on Ray Serve")
    for method, path, name in ROUTES:
        app.add_api_route(path, _endpoint(cls, name), methods=[method])
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return serve.ingress(app)(cls)


def _endpoint(cls, name: str):
    """A by-value copy of `cls.name` for a route. Serve marks `self` as injected by setting
    the endpoint's `__signature__`; on a module-level method that mark would not survive the
    trip to the replica (pickled by reference, re-imported), on this local function it does."""
    method = getattr(cls, name)

    async def endpoint(*args, **kwargs):
        return await method(*args, **kwargs)

    # by value: no globals (a function attribute Serve reads, unknown to the type checker)
    endpoint.__signature__ = inspect.signature(method, eval_str=True)  # type: ignore[attr-defined]
    endpoint.__name__, endpoint.__qualname__ = name, f"{cls.__qualname__}.{name}"
    return endpoint
