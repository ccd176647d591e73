"""The Router: the ingress (OpenAI-compatible HTTP via FastAPI, and the gRPC `DeerService`).

It owns each request's decode loop, and the loop is `deer_serve.engine.iter_generate` itself:
run in a worker thread over two proxies, `RemoteTarget` (deployments.verifier) and
`RemoteDrafter` (deployments.drafter), that implement the core's `TargetBackend` / `Drafter`
protocols with calls to the Verifier and Drafter deployments
(`handle.method.remote(...).result()`). No acceptance, sampling or caching here.

Per request:  parse (schemas.parse_request, shared by HTTP and gRPC) -> tokenize -> decode
thread --StepOutput--> asyncio queue -> JSON / SSE chunks / gRPC messages.

When the drafter fails or times out, the request goes on as plain AR decoding through the
verifier from the tokens emitted so far, and its `deer` stats say `fallback: true`.

The class is plain; `make_ingress` builds its FastAPI app (the routes in `ROUTES`) and applies
`serve.ingress`, and only `deployments.app.build_app` calls `serve.deployment`. The FastAPI app
is made inside the builder, not at module level, so that it is pickled by value with the routes
Serve rewrote for the class (a module-level app would be re-imported unrewritten by replicas).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Generator, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from deer_serve.engine import StepOutput, iter_generate
from deer_serve.types import SamplingParams
from deployments.drafter import DrafterUnavailable, RemoteDrafter
from deployments.schemas import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    ChatMessageOut, CompletionChoice, CompletionChunk, CompletionResponse, DeerStats,
    GenerationRequest, Limits, ModelCard, ModelList, RequestError, Usage, _id, _now,
    check_prompt, parse_request)
from deployments.verifier import RemoteTarget, VerifierUnavailable

log = logging.getLogger("deer_serve.router")

# ---- per-request state -------------------------------------------------------------------------
class RouterSettings(BaseModel):
    served_model_name: str = Field(description="the only accepted `model` value")
    tokenizer_path: str = Field(description="the target's tokenizer (and chat template)")
    block_size: int = Field(16, ge=1, le=64, description="default draft tokens per cycle")
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
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Outcome:
    token_ids: list[int]
    accept_lengths: list[int]
    cycles: int
    finish_reason: str
    fallback: bool
    timings: dict = field(default_factory=dict)

    def stats(self) -> DeerStats:
        a = self.accept_lengths
        return DeerStats(accept_lengths=a, mean_accepted=sum(a) / len(a) if a else 0.0,
                         cycles=self.cycles, fallback=self.fallback,
                         timings={k: round(v, 6) for k, v in self.timings.items()})


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

    # ---- shared by HTTP and gRPC
    def detokenize(self, ids: Sequence[int]) -> str:  # as `deer-serve generate` decodes
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    async def target_meta(self) -> dict:
        if self._target_meta is None:
            self._target_meta = await self.verifier.meta.remote()
        return self._target_meta

    def drafter_meta(self) -> dict:  # called in a decode thread
        if self._drafter_meta is None:
            try:
                self._drafter_meta = self.drafter.meta.remote().result(
                    timeout_s=self.settings.drafter_timeout_s)
            except Exception as e:
                raise DrafterUnavailable(f"drafter meta failed: {e!r}") from e
        return self._drafter_meta

    async def prepare(self, data: Any, kind: str) -> Prepared:
        s = self.settings
        req = parse_request(data, kind=kind, served_model=s.served_model_name, limits=s.limits)
        meta = await self.target_meta()
        if req.messages is not None:
            ids = self.tokenizer.encode(self.render_chat(req), add_special_tokens=False)
        elif isinstance(req.prompt, str):  # as `deer-serve generate` tokenizes
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=False)
        else:
            ids = list(req.prompt)
        check_prompt(ids, vocab_size=int(meta["vocab_size"]), limits=s.limits)
        try:
            sampling = req.sampling_params()
        except ValueError as e:
            raise RequestError(str(e), 400) from None
        return Prepared(req, ids, sampling, req.block_size or s.block_size)

    def render_chat(self, req: GenerationRequest) -> str:
        msgs = [{"role": m.role, "content": m.text} for m in req.messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=True)
        # no template (e.g. a base code model): a plain transcript ending in the assistant's turn
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"

    def decode(self, p: Prepared) -> Generator[StepOutput, None, Outcome]:
        """The request's decode loop (runs in a worker thread): the engine's loop, with the
        AR fallback when the drafter fails."""
        s = self.settings
        target = RemoteTarget(self.verifier, self._target_meta, s.verifier_timeout_s)
        mode, drafter, fallback = p.req.mode, None, False
        if mode == "deer":
            try:
                drafter = RemoteDrafter(self.drafter, self.drafter_meta(), s.drafter_timeout_s)
            except DrafterUnavailable as e:
                log.warning("request %s: %s; decoding plain AR", p.id, e)
                mode, fallback = "ar", True
        out: list[int] = []
        accepts: list[int] = []
        steps = 0
        it = iter_generate(target, drafter, p.prompt_ids, p.sampling, mode=mode,
                           block_size=p.block_size, detokenize=self.detokenize,
                           seq_id=f"{p.id}-0")
        try:
            while True:
                try:
                    step = next(it)
                except StopIteration as stop:
                    r = stop.value
                    return Outcome(r.token_ids, r.accept_lengths, r.cycles, r.finish_reason,
                                   fallback, r.timings)
                except DrafterUnavailable as e:
                    log.warning("request %s: %s; finishing with plain AR", p.id, e)
                    break
                steps += 1
                out += step.new_token_ids
                if step.accepted is not None:
                    accepts.append(step.accepted)
                yield step
        finally:
            it.close()  # releases both caches when the client went away
        # AR fallback from what was emitted: the target's distribution, conditioned on it.
        # (The deer part's timings are lost with its generator; the AR part's are reported.)
        prev = list(out)
        rest = replace(p.sampling, max_new_tokens=p.sampling.max_new_tokens - len(prev))
        it = iter_generate(target, None, p.prompt_ids + prev, rest, mode="ar",
                           block_size=p.block_size, seq_id=f"{p.id}-ar",
                           detokenize=lambda ids: self.detokenize(prev + ids))
        try:
            while True:
                try:
                    step = next(it)
                except StopIteration as stop:
                    r = stop.value
                    return Outcome(prev + r.token_ids, accepts, max(0, steps - 1) + r.cycles,
                                   r.finish_reason, True, r.timings)
                yield step
        finally:
            it.close()

    async def events(self, p: Prepared) -> AsyncIterator[tuple[str, Any]]:
        """("step", StepOutput)... then ("done", Outcome); raises what the decode raised."""
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

    async def complete(self, p: Prepared) -> tuple[Outcome, str]:
        async for kind, val in self.events(p):
            if kind == "done":
                return val, TextStream(self.detokenize, p.sampling.stop).push(val.token_ids, True)
        raise RuntimeError("decode ended without a result")

    async def stream(self, p: Prepared) -> AsyncIterator[tuple[str, list[int], Optional[Outcome]]]:
        """(text delta, new token ids, Outcome on the last item)."""
        ts = TextStream(self.detokenize, p.sampling.stop)
        async for kind, val in self.events(p):
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
    async def _read(self, request: Request, kind: str) -> Prepared:
        raw = await request.body()
        if len(raw) > self.settings.limits.max_body_bytes:
            raise RequestError(f"the body is larger than {self.settings.limits.max_body_bytes} "
                               "bytes", 413, code="request_too_large")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON: {e}", 400,
                               code="invalid_json") from None
        return await self.prepare(data, kind)

    async def _openai(self, request: Request, kind: str):
        try:
            p = await self._read(request, kind)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        name = self.settings.served_model_name
        if p.req.stream:
            return StreamingResponse(self._sse(p, kind), media_type="text/event-stream")
        try:
            o, text = await self.complete(p)
        except Exception as e:
            return _server_error(e)
        if kind == "chat":
            resp = ChatCompletionResponse(model=name, choices=[ChatChoice(
                message=ChatMessageOut(content=text), finish_reason=o.finish_reason,
                token_ids=o.token_ids)], usage=self.usage(p, o), deer=o.stats())
        else:
            resp = CompletionResponse(model=name, choices=[CompletionChoice(
                text=text, finish_reason=o.finish_reason, token_ids=o.token_ids)],
                usage=self.usage(p, o), deer=o.stats())
        return JSONResponse(resp.model_dump())

    async def _sse(self, p: Prepared, kind: str) -> AsyncIterator[str]:
        name, rid, created = self.settings.served_model_name, _id(
            "chatcmpl" if kind == "chat" else "cmpl"), _now()

        def chunk(text: Optional[str], ids, finish=None, deer=None, role=None, usage=None,
                  choices=True) -> str:
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

        try:
            if kind == "chat":
                yield chunk("", [], role="assistant")
            async for delta, ids, o in self.stream(p):
                if o is None:
                    yield chunk(delta, ids)
                else:
                    yield chunk(delta, ids, finish=o.finish_reason, deer=o.stats())
                    if p.req.stream_options and p.req.stream_options.include_usage:
                        yield chunk(None, [], usage=self.usage(p, o), choices=False)
        except Exception as e:
            status, body = _error_body(e)
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    async def completions(self, request: Request):
        return await self._openai(request, "completions")

    async def chat_completions(self, request: Request):
        return await self._openai(request, "chat")

    async def models(self):
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
            p = await self.prepare(_proto_fields(request), "grpc")
            o, text = await self.complete(p)
        except Exception as e:
            _grpc_fail(grpc_context, e)
            return deer_pb2.GenerateResponse()
        return deer_pb2.GenerateResponse(text=text, token_ids=o.token_ids,
                                         finish_reason=o.finish_reason, deer=_pb_stats(o))

    async def GenerateStream(self, request, grpc_context=None):
        from deer_serve.protos import deer_pb2

        try:
            p = await self.prepare(_proto_fields(request), "grpc")
            async for delta, ids, o in self.stream(p):
                if o is None:
                    yield deer_pb2.GenerateChunk(text=delta, token_ids=ids)
                else:
                    yield deer_pb2.GenerateChunk(text=delta, token_ids=ids,
                                                 finish_reason=o.finish_reason, deer=_pb_stats(o))
        except Exception as e:
            # a streaming method's status only reaches the proxy with a yielded message or an
            # exception; Serve keeps the code set on grpc_context when we raise
            _grpc_fail(grpc_context, e)
            raise

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


def _server_error(e: Exception) -> JSONResponse:
    status, body = _error_body(e)
    return JSONResponse(body, status_code=status)


def _grpc_fail(ctx, e: Exception) -> None:
    import grpc

    if isinstance(e, RequestError):
        code, msg = grpc.StatusCode.INVALID_ARGUMENT, e.message
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

    endpoint.__signature__ = inspect.signature(method, eval_str=True)  # by value: no globals
    endpoint.__name__, endpoint.__qualname__ = name, f"{cls.__qualname__}.{name}"
    return endpoint
