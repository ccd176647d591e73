"""The service edge: ONE request type behind HTTP and gRPC, OpenAI's response and error shapes.

Both adapters turn what they received into a plain dict and call `parse_request`, the single
validation path; it raises `RequestError` (HTTP status + OpenAI error fields), which the HTTP
adapter returns as {"error": {...}} and the gRPC adapter as INVALID_ARGUMENT.

Status codes: 400 for a value out of range or a malformed body, 422 for a wrong type or a
missing field, 404 for a model we do not serve, 413 for a body or prompt over the limits.

Defaults differ from OpenAI's in one place: `temperature` defaults to 0 (greedy, the
lossless-check regime), where OpenAI defaults to 1. Unknown fields are ignored (OpenAI clients
send many); `null` means "not given".
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from deer_serve.types import SamplingParams

MAX_BLOCK_SIZE = 64  # = deer_serve.engine.MAX_BLOCK_SIZE (not imported: the engine pulls in torch)
MAX_STOP = 4         # as OpenAI
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # or exactly 0 (greedy)


class Limits(BaseModel):
    """Per-request limits the server enforces (a request over them is the client's mistake)."""

    max_tokens: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(8192, ge=1, description="longest prompt, in tokens")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest HTTP body (413 above)")
    max_stop_chars: int = Field(256, ge=1, description="longest stop string, in characters")
    max_messages: int = Field(512, ge=1, description="most chat messages in one request")


class TracingConfig(BaseModel):
    """OpenTelemetry tracing of the Router: spans request -> cycle -> prefill / draft / verify."""

    model_config = ConfigDict(extra="forbid")
    exporter: Literal["none", "console", "otlp", "memory"] = Field(
        "none", description="none; console (the Router's stdout); otlp (OTLP/HTTP to "
                            "otlp_endpoint); memory (kept in the replica, for tests)")
    otlp_endpoint: Optional[str] = Field(
        None, description="e.g. http://127.0.0.1:4318/v1/traces (default: the OTEL_EXPORTER_"
                          "OTLP_* environment variables)")
    service_name: str = Field("deer-serve", description="the resource's service.name")
    memory_spans: int = Field(10000, ge=1, description="spans the memory exporter keeps")


class ServiceOptions(BaseModel):
    """Security, backpressure, fault handling and tracing of the ingress (the Router)."""

    api_keys: list[str] = Field(
        default_factory=list, description="accepted API keys (HTTP `Authorization: Bearer "
        "KEY`, gRPC metadata `authorization: Bearer KEY` or `x-api-key`); none and no "
        "api_keys_env variable = no authentication")
    api_keys_env: str = Field(
        "DEER_SERVE_API_KEYS", description="environment variable (in the Router's process) "
        "with more comma-separated keys; keeps keys out of config files")
    max_pending_requests: int = Field(
        128, ge=1, description="requests decoding or waiting for a decode thread in one Router "
        "replica; more get 429 (gRPC RESOURCE_EXHAUSTED) with Retry-After")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of 429 and 503 answers")
    verifier_resumes: int = Field(
        3, ge=0, description="times one request is resumed from its token ids after a verifier "
                             "call fails (a dead replica); then 503 / UNAVAILABLE")
    verifier_resume_window_s: float = Field(
        30.0, gt=0, description="after a verifier failure, the request gives up (503) when it "
                                "has not resumed within this many seconds")
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    # the decode loop's transport (issue: every draft and verify is a call between replicas)
    transport: Literal["channel", "object-store"] = Field(
        "channel", description="draft and verify calls: 'channel' = one Serve call per request "
        "and pool picks the replica (with `affinity`, by the request's hash), the request's "
        "calls then go over an authenticated socket to it (deployments.channel; Serve's "
        "ongoing-request count does not see them: autoscale by the busy fraction, "
        "deployments.autoscaling); 'object-store' = every call through Ray's object store "
        "(Serve's default)")
    affinity: bool = Field(
        True, description="every call of one request goes to the same Drafter and Verifier "
        "replica (Serve's consistent-hash request router over the request id as session), so "
        "their KV caches are hits; off = Serve's power-of-two-choices per call")
    loop: Literal["router", "colocated"] = Field(
        "router", description="where a request's decode loop runs: 'router' (the Router calls "
        "the Drafter and the Verifier every cycle: two remote calls) or 'colocated' (one "
        "streaming call to a Verifier replica, which runs the loop with a drafter in its own "
        "process: no remote call in the cycle; drafter and target then scale together, as one "
        "pool; spans stop at the request)")
    greedy_argmax: bool = Field(
        True, description="at temperature 0 the Verifier replies with each position's argmax "
        "token instead of its logits (k+1 ints instead of (k+1) x V floats)")
    pipeline: bool = Field(
        False, description="default of the request field `pipeline`: while block b is "
        "verified, the Drafter pre-drafts block b+1 for b's most likely outcome "
        "(deer_serve.engine.Pipeliner)")
    lookup: bool = Field(
        True, description="prompt lookup spliced into each drafted block after its confident "
        "head (deer_serve.drafters.lookup, as `deer-serve generate --lookup merge`); off = the "
        "diffusion drafter's block alone")

    @field_validator("transport", "loop", mode="before")
    @classmethod
    def _not_dropped(cls, v: Any, info: ValidationInfo) -> Any:
        """A config that names a removed topology is told so, not only shown the allowed values."""
        why = _DROPPED.get((info.field_name or "", v)) if isinstance(v, str) else None
        if why is not None:
            raise ValueError(f"{info.field_name} {v!r} was removed (issue 20): {why}")
        return v


# the topologies removed in issue 20 (measurements: docs/RESULTS.md), and what to use instead
_DROPPED = {("transport", "direct"): "the channel transport was faster in every measurement; "
                                     "use 'channel' (the default) or 'object-store'",
            ("loop", "verifier"): "the service keeps two loop placements; use 'router' (the "
                                  "default) or 'colocated'"}


class RequestError(Exception):
    """A client's mistake: becomes OpenAI's error object (HTTP) or INVALID_ARGUMENT (gRPC)."""

    def __init__(self, message: str, status: int = 400, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.type = message, status, type
        self.param, self.code = param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type,
                                               param=self.param, code=self.code)).model_dump()


# ---- the request ------------------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart]] = ""

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What every endpoint asks for. Exactly one of `prompt` (completions, gRPC) and `messages`
    (chat; the router renders them to a prompt with the tokenizer's chat template)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: Optional[str] = Field(None, description="the served model name; omit for the default")
    prompt: Optional[Union[str, list[int]]] = Field(
        None, description="text, or token ids; one prompt per request")
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, description="chat turns")
    max_tokens: int = Field(64, ge=1, description="new tokens at most (1..limits.max_tokens)")
    max_completion_tokens: Optional[int] = Field(
        None, ge=1, description="OpenAI's newer name for max_tokens; wins when both are given")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (our default; OpenAI's is 1)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass kept")
    top_k: int = Field(0, ge=0, description="0 = off")
    block_size: Optional[int] = Field(None, ge=1, le=MAX_BLOCK_SIZE,
                                      description="draft tokens per cycle; None = server default")
    adaptive_k: Optional[bool] = Field(
        None, description="block size per cycle from this request's acceptance (block_size is "
        "the largest), with plain AR stretches where drafting does not pay; None = server "
        "default")
    pipeline: Optional[bool] = Field(
        None, description="pre-draft the next block while this one is verified (used when the "
        "verifier's outcome is the one it was drafted for); None = server default")
    seed: Optional[int] = Field(None, ge=0, lt=1 << 64, description="reproducible sampling")
    stop: Optional[Union[str, list[str]]] = Field(
        None, description=f"up to {MAX_STOP} strings; the text is cut before the first one")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    mode: Literal["deer", "ar"] = Field("deer", description="deer = speculative, ar = plain")
    n: int = Field(1, ge=1, le=1, description="choices per request: only 1 is supported")
    user: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("prompt token ids must be >= 0")
        return v

    @property
    def new_tokens(self) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=float(self.temperature), top_p=float(self.top_p),
                              top_k=int(self.top_k), max_new_tokens=self.new_tokens,
                              seed=self.seed, stop=self.stops).validate()


# pydantic error types that mean "right type, wrong value" (400); anything else is 422
_VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                 "too_short", "too_long", "literal_error", "value_error", "finite_number",
                 "assertion_error", "enum"}


RequestKind = Literal["completions", "chat", "grpc"]  # which API a request came through


def parse_request(data: Any, *, kind: RequestKind,
                  served_model: str, limits: Limits) -> GenerationRequest:
    """THE validation path: dict -> GenerationRequest, or RequestError."""
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object", 400)
    try:
        req = GenerationRequest.model_validate(data)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        status = 400 if all(x["type"] in _VALUE_ERRORS for x in errs) else 422
        first = errs[0]
        param = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)
                         and p not in ("str", "list[str]", "list[int]", "list[TextPart]")) or None
        msgs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in errs[:5])
        raise RequestError(msgs, status, param=param,
                           code="invalid_type" if status == 422 else "invalid_value") from None
    if req.model not in (None, "", served_model):
        raise RequestError(f"The model '{req.model}' does not exist; this server serves "
                           f"'{served_model}'", 404, param="model", code="model_not_found")
    if req.temperature != 0 and not MIN_TEMPERATURE <= req.temperature <= MAX_TEMPERATURE:
        # a tiny positive temperature overflows logits / T to inf (NaN probabilities)
        raise RequestError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, "
                           f"{MAX_TEMPERATURE}], got {req.temperature}", 400,
                           param="temperature", code="invalid_value")
    if any(len(s) > limits.max_stop_chars for s in req.stops):
        raise RequestError(f"stop strings must be at most {limits.max_stop_chars} characters",
                           400, param="stop", code="invalid_value")
    if req.messages is not None and len(req.messages) > limits.max_messages:
        raise RequestError(f"at most {limits.max_messages} messages", 400, param="messages",
                           code="invalid_value")
    if req.new_tokens > limits.max_tokens:
        raise RequestError(f"max_tokens must be at most {limits.max_tokens}, got {req.new_tokens}",
                           400, param="max_tokens", code="invalid_value")
    if kind == "chat":
        if req.messages is None:
            raise RequestError("'messages' is required", 422, param="messages", code="missing")
        if req.prompt is not None:
            raise RequestError("chat completions take 'messages', not 'prompt'", 400,
                               param="prompt")
    else:
        if req.prompt is None:
            raise RequestError("'prompt' is required", 422 if kind != "grpc" else 400,
                               param="prompt", code="missing")
        if req.messages is not None:
            raise RequestError("completions take 'prompt', not 'messages'", 400, param="messages")
    return req


def check_prompt(ids: list[int], *, vocab_size: int, limits: Limits) -> list[int]:
    """The prompt after tokenization: non-empty, in the vocabulary, within the limit."""
    if not ids:
        raise RequestError("the prompt is empty (no tokens)", 400, param="prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise RequestError(f"the prompt has {len(ids)} tokens, more than the limit of "
                           f"{limits.max_prompt_tokens}", 400, param="prompt",
                           code="context_length_exceeded")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}", 400,
                           param="prompt")
    return ids


# ---- responses --------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class DeerStats(BaseModel):
    accept_lengths: list[int] = Field(default_factory=list,
                                      description="accepted draft tokens per cycle")
    mean_accepted: float = Field(0.0, description="tau: mean of accept_lengths")
    cycles: int = Field(0, description="target forwards after the prefill")
    fallback: bool = Field(False, description="the drafter failed; plain AR finished the request")
    pipeline_hits: Optional[int] = Field(None, description="pre-drafts used (pipelining on)")
    pipeline_misses: Optional[int] = Field(None, description="pre-drafts dropped (pipelining on)")
    timings: dict[str, float] = Field(
        default_factory=dict, description="seconds: prefill, draft and verify (compute in the "
        "replicas), waiting (queued in a replica behind other requests' forwards), transport "
        "(the rest of the remote calls: network, serialization, Serve), other (the loop's own "
        "work)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _now() -> int:
    return int(time.time())


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[Literal["length", "stop"]] = None
    logprobs: None = None
    token_ids: list[int] = Field(default_factory=list, description="extension: the new token ids")


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    deer: Optional[DeerStats] = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Optional[Literal["length", "stop"]] = None
    logprobs: None = None
    token_ids: list[int] = Field(default_factory=list, description="extension: the new token ids")


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None
    deer: Optional[DeerStats] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Optional[Literal["length", "stop"]] = None
    logprobs: None = None
    token_ids: list[int] = Field(default_factory=list)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    deer: Optional[DeerStats] = Field(None, description="on the last chunk")


class CompletionChunk(BaseModel):
    """OpenAI streams completions as `text_completion` objects with a partial `text`."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    deer: Optional[DeerStats] = Field(None, description="on the last chunk")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "deer-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
