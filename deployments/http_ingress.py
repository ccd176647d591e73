"""The HTTP adapter of the Router: OpenAI-compatible routes (FastAPI), mapped onto the Router's
one request type and back.

`POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /healthz`. A body is
read (bounded by `limits.max_body_bytes`, JSON only), handed to `Router.prepare` (the one
validation path, shared with gRPC) and answered as JSON or as server-sent events ending in
`data: [DONE]`. Errors use OpenAI's error shape; a client's mistake is never a 500.

`HttpIngress` is a mixin of `deployments.router.Router`; `fastapi_app(cls)` builds the FastAPI
app whose routes call those methods, for `router.make_ingress`.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import TYPE_CHECKING, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from deployments.clients import VerifierUnavailable
from deployments.ingress_core import IngressCore
from deployments.schemas import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                 ChatCompletionResponse, ChatDelta, ChatMessageOut,
                                 CompletionChoice, CompletionChunk, CompletionResponse, ModelCard,
                                 ModelList, RequestError, RequestKind, _id, _now)
from deployments.security import http_key

if TYPE_CHECKING:
    from deployments.router import Prepared

log = logging.getLogger("deer_serve.router")


class HttpIngress(IngressCore):
    """The Router's HTTP methods (FastAPI routes: `ROUTES`)."""

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
        except ClientDisconnect:  # the client went away before its body arrived
            slot.release()
            self._count_cancelled("before its body arrived")
            return Response(status_code=499)  # nobody reads it
        except Exception as e:
            slot.release()
            return self._http_error(e)
        except BaseException:  # cancelled: the client went away while its body was read
            slot.release()
            self._count_cancelled("before its decode started")
            raise
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
        status, body = error_body(e)
        self._count_error(e, status)
        headers = {}
        if status in (429, 503):
            headers["retry-after"] = str(self.settings.retry_after_s)
        if status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(body, status_code=status, headers=headers or None)

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
            status, body = error_body(e)
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
        import asyncio

        out, ok = {}, True
        for name, h in (("verifier", self.verifier), ("drafter", self.drafter)):
            try:
                out[name] = await asyncio.wait_for(h.health.remote(), 10.0)
            except Exception as e:
                out[name] = {"ok": False, "error": repr(e)}
                ok = ok and name != "verifier"  # without a drafter we still serve (plain AR)
        body = {"status": "ok" if ok else "unavailable", **out}
        return JSONResponse(body, status_code=200 if ok else 503)


def error_body(e: Exception) -> tuple[int, dict]:
    """(HTTP status, OpenAI error object) of a failed request."""
    if isinstance(e, RequestError):
        return e.status, e.body()
    if isinstance(e, VerifierUnavailable):
        log.error("verifier unavailable: %s", e)
        return 503, RequestError("the verifier is unavailable; try again later", 503,
                                 type="service_unavailable", code="verifier_unavailable").body()
    log.exception("internal error", exc_info=e)
    return 500, RequestError("internal server error", 500, type="server_error").body()


async def _not_found(request: Request, exc: StarletteHTTPException):
    """Unknown paths and methods in OpenAI's error shape too."""
    return JSONResponse(RequestError(str(exc.detail), exc.status_code,
                                     code="not_found" if exc.status_code == 404 else None).body(),
                        status_code=exc.status_code)


# method, path, Router method name
ROUTES = [("POST", "/v1/completions", "completions"),
          ("POST", "/v1/chat/completions", "chat_completions"),
          ("GET", "/v1/models", "models"),
          ("GET", "/healthz", "healthz")]


def fastapi_app(cls) -> FastAPI:
    """The FastAPI app whose `ROUTES` call `cls`'s methods (for `serve.ingress(app)(cls)`)."""
    app = FastAPI(title="deer-serve", description="DEER speculative decoding on Ray Serve")
    for method, path, name in ROUTES:
        app.add_api_route(path, _endpoint(cls, name), methods=[method])
    # (Starlette's documented handler shape; its stubs only accept handlers of any Exception)
    app.add_exception_handler(StarletteHTTPException, _not_found)  # type: ignore[arg-type]
    return app


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
