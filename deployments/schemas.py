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
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deer_serve.engine import MAX_BLOCK_SIZE
from deer_serve.types import SamplingParams

if TYPE_CHECKING:
    from deployments.app import Limits

MAX_STOP = 4         # as OpenAI
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # or exactly 0 (greedy)


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
