"""The deployment classes in-process, without Ray: the Router's decode loop over the Drafter and
Verifier classes through `LocalHandle`, an adapter with Serve's call shape
(`handle.method.remote(...).result()` / `await handle.method.remote(...)`). The models are real
(tiny, random); the service tests run the same classes on a real Ray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("pydantic")
pytest.importorskip("fastapi")

from deer_serve.engine import generate  # noqa: E402
from deer_serve.targets.hf import HFTarget  # noqa: E402
from deer_serve.types import SamplingParams  # noqa: E402
from deployments.clients import RemoteTarget  # noqa: E402
from deployments.drafter import Drafter  # noqa: E402
from deployments.http_ingress import error_body  # noqa: E402
from deployments.router import Router, RouterSettings  # noqa: E402
from deployments.schemas import RequestError  # noqa: E402
from deployments.session import DecodeSpec  # noqa: E402
from deployments.text import TextStream  # noqa: E402
from deployments.verifier import Verifier  # noqa: E402

PROMPT = "def add(a, b):\n"


class _Call:
    def __init__(self, fn, args, kw):
        self.fn, self.args, self.kw = fn, args, kw

    def result(self, timeout_s=None):
        return self.fn(*self.args, **self.kw)

    def __await__(self):
        async def run():
            return self.fn(*self.args, **self.kw)
        return run().__await__()


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kw):
        return _Call(self.fn, args, kw)


class LocalHandle:
    """Serve's handle call shape over a local object; `hook(name, n)` runs before each call
    (n counts calls of that method) and may raise to play a failing replica."""

    def __init__(self, obj, hook=None):
        self.obj, self.hook, self.calls = obj, hook, {}

    def options(self, **kw):  # Serve's per-request handle options (transport, session)
        self.last_options = kw
        return self

    def __getattr__(self, name):
        fn = getattr(self.obj, name)

        def call(*args, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.hook:
                self.hook(name, self.calls[name])
            return fn(*args, **kw)
        return _Method(call)


@pytest.fixture(scope="module")
def verifier(tiny_checkpoints):
    # the layers the target-features drafter reads, as build_app passes them
    from deployments.app import AppConfig, check_models

    cfg = AppConfig(target_path=str(tiny_checkpoints["target"]),
                    drafter_path=str(tiny_checkpoints["drafter-target-features"])).resolved()
    return Verifier(str(tiny_checkpoints["target"]), device="cpu",
                    feature_layers=check_models(cfg))


@pytest.fixture(scope="module")
def drafters(tiny_checkpoints):
    return {m: Drafter(str(tiny_checkpoints[f"drafter-{m}"]), device="cpu")
            for m in ("tokens", "target-features")}


def make_router(tiny_checkpoints, drafter, verifier, **kw) -> Router:
    """transport defaults to `object-store` here: every call through the LocalHandle (whose
    hooks play failing replicas); tests/deployments/test_channel.py runs `channel`."""
    kw.setdefault("transport", "object-store")
    settings = RouterSettings(served_model_name="target", tokenizer_path=str(
        tiny_checkpoints["target"]), block_size=4, **kw)
    d = drafter if isinstance(drafter, LocalHandle) else LocalHandle(drafter)
    return Router(d, LocalHandle(verifier), settings.model_dump())


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """Greedy plain AR of the target, in-process."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoints["target"]))
    target = HFTarget.from_pretrained(str(tiny_checkpoints["target"]), device="cpu")

    def ref(prompt: str, n: int, stop=()):
        return generate(target, None, tok.encode(prompt, add_special_tokens=False),
                        SamplingParams(max_new_tokens=n, stop=tuple(stop)), mode="ar",
                        detokenize=lambda ids: tok.decode(ids, skip_special_tokens=True))
    return ref


def complete(router: Router, body: dict, kind: str = "completions"):
    async def go():
        p = await router.prepare(body, kind)
        return await router.complete(p)
    return asyncio.run(go())


def stream(router: Router, body: dict):
    async def go():
        p = await router.prepare(body, "completions")
        return [x async for x in router.stream(p)]
    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["tokens", "target-features"])
def test_greedy_deer_through_the_router_is_plain_ar(tiny_checkpoints, drafters, verifier,
                                                    reference, mode):
    router = make_router(tiny_checkpoints, drafters[mode], verifier)
    ref = reference(PROMPT, 20)
    o, text = complete(router, {"prompt": PROMPT, "max_tokens": 20})
    assert o.token_ids == ref.token_ids and text == ref.text and not o.fallback
    assert o.cycles >= 1 and len(o.accept_lengths) >= 1
    parts = stream(router, {"prompt": PROMPT, "max_tokens": 20})
    assert "".join(t for t, _, _ in parts) == text
    assert [i for _, ids, _ in parts for i in ids] == o.token_ids
    assert parts[-1][2].finish_reason == o.finish_reason


def test_stop_strings_are_cut_and_never_streamed(tiny_checkpoints, drafters, verifier, reference):
    router = make_router(tiny_checkpoints, drafters["tokens"], verifier)
    full = reference(PROMPT, 30).text
    stop = full[5:7] if len(full) > 8 else None
    if not stop:
        pytest.skip("the random target's text is too short for a stop string")
    ref = reference(PROMPT, 30, stop=[stop])
    o, text = complete(router, {"prompt": PROMPT, "max_tokens": 30, "stop": stop})
    assert o.finish_reason == "stop" and text == ref.text and stop not in text
    parts = stream(router, {"prompt": PROMPT, "max_tokens": 30, "stop": [stop]})
    assert "".join(t for t, _, _ in parts) == text


def test_a_drafter_replica_without_the_feature_rows_asks_for_them(tiny_checkpoints, drafters,
                                                                  verifier, reference):
    """Two drafter replicas taking turns: each call finds the other's rows missing, answers
    need_rows_from, and the router resends; the output stays the target's."""
    a = drafters["target-features"]
    b = Drafter(str(tiny_checkpoints["drafter-target-features"]), device="cpu")
    misses = []

    class Alternating:
        def __init__(self):
            self.n = 0

        def __getattr__(self, name):
            if name != "draft":
                return getattr(a, name)

            def draft(*args, **kw):
                self.n += 1
                r = (a if self.n % 2 else b).draft(*args, **kw)
                if r.need_rows_from is not None:
                    misses.append(r.need_rows_from)
                return r
            return draft

    router = make_router(tiny_checkpoints, LocalHandle(Alternating()), verifier)
    ref = reference(PROMPT, 16)
    o, text = complete(router, {"prompt": PROMPT, "max_tokens": 16})
    assert o.token_ids == ref.token_ids and not o.fallback
    assert misses and all(m >= 0 for m in misses)


def test_drafter_rows_from_a_cold_replica(tiny_checkpoints, drafters):
    d = Drafter(str(tiny_checkpoints["drafter-target-features"]), device="cpu")
    F = d.backend.model.config.target_feature_dim
    ids = np.arange(2, 12, dtype=np.int32)
    g = SamplingParams()
    r = d.draft("s", ids, 5, 4, g, None, np.zeros((3, F), np.float16), hidden_start=7)
    assert r.need_rows_from == 0 and r.tokens is None
    r = d.draft("s", ids, 5, 4, g, None, np.zeros((10, F), np.float16), hidden_start=0)
    assert r.need_rows_from is None and r.tokens.shape == (4,) and r.tokens.dtype == np.int32
    # the replica now holds 10 rows: sending only the new ones is enough
    r = d.draft("s", np.arange(2, 14, dtype=np.int32), 5, 4, g, None,
                np.zeros((2, F), np.float16), hidden_start=10)
    assert r.need_rows_from is None


@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_failing_drafter_falls_back_to_plain_ar(tiny_checkpoints, drafters, verifier,
                                                  reference, fail_at):
    def hook(name, n):
        if name in ("draft", "meta") and n >= fail_at:
            raise TimeoutError("drafter replica gone")

    drafter = LocalHandle(drafters["tokens"], hook)
    router = make_router(tiny_checkpoints, drafter, verifier)
    ref = reference(PROMPT, 20)
    o, text = complete(router, {"prompt": PROMPT, "max_tokens": 20})
    assert o.fallback and o.token_ids == ref.token_ids and text == ref.text
    assert o.finish_reason == ref.finish_reason


def test_a_failing_verifier_is_a_503_not_a_client_error(tiny_checkpoints, drafters, verifier):
    router = make_router(tiny_checkpoints, drafters["tokens"], verifier)
    asyncio.run(router.target_meta())

    def hook(name, n):
        if name == "score":
            raise RuntimeError("verifier replica died")
    router.verifier = LocalHandle(verifier, hook)
    with pytest.raises(Exception) as e:
        complete(router, {"prompt": PROMPT, "max_tokens": 4})
    status, body = error_body(e.value)
    assert status == 503 and body["error"]["type"] == "service_unavailable"


def test_prompt_checks_after_tokenization(tiny_checkpoints, drafters, verifier):
    router = make_router(tiny_checkpoints, drafters["tokens"], verifier,
                         limits={"max_prompt_tokens": 30})
    for body, status in [({"prompt": [10**6]}, 400), ({"prompt": "x" * 200}, 400),
                         ({"prompt": [1, 2], "model": "other"}, 404)]:
        with pytest.raises(RequestError) as e:
            asyncio.run(router.prepare(body, "completions"))
        assert e.value.status == status
    p = asyncio.run(router.prepare({"messages": [{"role": "user", "content": "hi"}]}, "chat"))
    assert p.prompt_ids and p.block_size == 4


class FakeGrpcContext:
    def __init__(self):
        self.code, self.details = None, None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_grpc_methods(tiny_checkpoints, drafters, verifier, reference):
    import grpc

    from deer_serve.protos import deer_pb2

    router = make_router(tiny_checkpoints, drafters["tokens"], verifier)
    ref = reference(PROMPT, 12)
    ctx = FakeGrpcContext()
    r = asyncio.run(router.Generate(deer_pb2.GenerateRequest(prompt=PROMPT, max_tokens=12,
                                                             temperature=0.0), ctx))
    assert ctx.code is None and list(r.token_ids) == ref.token_ids and r.text == ref.text

    async def chunks(req, ctx):
        return [c async for c in router.GenerateStream(req, ctx)]
    got = asyncio.run(chunks(deer_pb2.GenerateRequest(prompt=PROMPT, max_tokens=12), ctx))
    assert [t for c in got for t in c.token_ids] == ref.token_ids

    for bad in (deer_pb2.GenerateRequest(prompt=PROMPT, max_tokens=0),
                deer_pb2.GenerateRequest(prompt=PROMPT, seed=0, temperature=-2.0)):
        ctx = FakeGrpcContext()
        asyncio.run(router.Generate(bad, ctx))
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details
        ctx = FakeGrpcContext()
        with pytest.raises(RequestError):
            asyncio.run(chunks(bad, ctx))
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    vocab = {1: "ab", 2: "c", 3: "\n", 4: "\n", 5: "d", 6: "\xe2", 7: "\x82\xac"}

    def decode(ids):  # byte-level, like the real tokenizers
        return "".join(vocab[i] for i in ids).encode("latin-1").decode("utf-8", "replace")

    ts = TextStream(decode, ["\n\n"])
    assert ts.push([1], False) == "ab"
    assert ts.push([3], False) == ""       # may begin the stop string: held back
    assert ts.push([2], False) == "\nc"    # it did not
    assert ts.push([6], False) == ""       # half a UTF-8 character: held back
    assert ts.push([7], False) == "€"
    assert ts.push([3, 4, 5], True) == ""  # the stop string and what follows are cut
    assert ts.full_text() == "ab\nc€"


def test_argmax_replies_carry_the_logits_argmax_and_nothing_else(verifier):
    ids = np.arange(5, 25, dtype=np.int32)
    full = verifier.score("argmax-a", ids, 6, True)
    small = verifier.score("argmax-b", ids, 6, True, None, True)
    assert small.logits is None and small.argmax.dtype == np.int32
    assert small.argmax.tolist() == full.logits.argmax(-1).tolist()
    assert np.array_equal(small.hidden, full.hidden)
    meta = verifier.meta()
    remote = RemoteTarget(LocalHandle(verifier), meta, 30.0, argmax_only=True)
    r = remote.score("argmax-c", ids.tolist(), 6)
    assert r.logits is None and r.argmax().tolist() == full.logits.argmax(-1).tolist()


def test_router_calls_carry_the_request_as_session(tiny_checkpoints, drafters, verifier):
    on = make_router(tiny_checkpoints, drafters["tokens"], verifier)
    h = on.call_handle(LocalHandle(verifier), "req-1")
    assert h.last_options == {"session_id": "req-1"}
    off = make_router(tiny_checkpoints, drafters["tokens"], verifier,
                      transport="object-store", affinity=False)
    plain = LocalHandle(verifier)
    assert off.call_handle(plain, "req-1") is plain and not hasattr(plain, "last_options")


@pytest.mark.parametrize("server_default", [False, True])
def test_adaptive_k_requests_through_the_router_are_plain_ar(tiny_checkpoints, drafters, verifier,
                                                             reference, server_default):
    # lookup off: the tiny target's text repeats, and lookup would keep acceptance high
    router = make_router(tiny_checkpoints, drafters["target-features"], verifier,
                         adaptive_k=server_default, lookup=False)
    ref = reference(PROMPT, 40)
    body = {"prompt": PROMPT, "max_tokens": 40}
    if not server_default:
        body["adaptive_k"] = True
    o, text = complete(router, body)
    assert o.token_ids == ref.token_ids and text == ref.text and not o.fallback
    fixed, _ = complete(router, {"prompt": PROMPT, "max_tokens": 40, "adaptive_k": False})
    assert fixed.token_ids == ref.token_ids
    # the tiny random drafter is rarely right: adaptive requests take plain AR stretches
    assert len(o.accept_lengths) < len(fixed.accept_lengths)


@pytest.mark.parametrize("mode", ["tokens", "target-features"])
def test_pipelined_requests_through_the_router_are_plain_ar(tiny_checkpoints, drafters, verifier,
                                                            reference, mode):
    """The request field `pipeline` (and the server default): pre-drafts go through the
    Drafter's `prefix` and the RemoteDrafter's `draft_async`; hits and misses reach the stats."""
    ref = reference(PROMPT, 40)
    router = make_router(tiny_checkpoints, drafters[mode], verifier, lookup=False)
    o, text = complete(router, {"prompt": PROMPT, "max_tokens": 40, "pipeline": True})
    assert o.token_ids == ref.token_ids and text == ref.text and not o.fallback
    s = o.stats()
    assert s.pipeline_hits is not None and s.pipeline_hits + s.pipeline_misses > 0
    plain, _ = complete(router, {"prompt": PROMPT, "max_tokens": 40})  # server default: off
    assert plain.token_ids == ref.token_ids and plain.stats().pipeline_hits is None
    on = make_router(tiny_checkpoints, drafters[mode], verifier, pipeline=True)
    o2, _ = complete(on, {"prompt": PROMPT, "max_tokens": 40})
    assert o2.token_ids == ref.token_ids and o2.stats().pipeline_hits is not None


@pytest.mark.parametrize("transport", ["object-store", "channel"])
def test_request_timings_split_compute_waiting_and_transport(tiny_checkpoints, drafters, verifier,
                                                            transport):
    router = make_router(tiny_checkpoints, drafters["target-features"], verifier,
                         transport=transport)
    o, _ = complete(router, {"prompt": PROMPT, "max_tokens": 24})
    t = o.timings
    assert {"prefill", "draft", "verify", "other", "waiting", "transport"} <= set(t)
    assert t["draft"] > 0 and t["verify"] > 0 and t["waiting"] >= 0 and t["transport"] >= 0


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_verifier_with_its_own_drafter_decodes_plain_ar(tiny_checkpoints, reference, pipeline):
    """`loop: colocated`: the Verifier replica drafts with a Drafter in its own process (through
    `deployments.verifier.LocalHandle`: RemoteDrafter's calls in a thread pool, so a pre-draft
    overlaps the verify); greedy output is plain AR's, the replica reports its draft compute,
    and a Verifier without a drafter refuses the loop instead of hanging. A segment is sent as
    a `DecodeSpec` (deployments.session)."""
    from transformers import AutoTokenizer

    from deployments.app import AppConfig, check_models

    cfg = AppConfig(target_path=str(tiny_checkpoints["target"]),
                    drafter_path=str(tiny_checkpoints["drafter-target-features"])).resolved()
    v = Verifier(str(tiny_checkpoints["target"]), device="cpu", feature_layers=check_models(cfg),
                 colocated_drafter={"drafter_path": cfg.drafter_path, "device": "cpu"})
    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoints["target"]))
    ids = np.asarray(tok.encode(PROMPT, add_special_tokens=False), dtype=np.int32)
    ref = reference(PROMPT, 32)

    def spec(seq_id: str, n: int = 32) -> DecodeSpec:
        return DecodeSpec(token_ids=ids, emitted=0, sampling=SamplingParams(max_new_tokens=n),
                          mode="deer", block_size=4, seq_id=seq_id, adaptive_k=False,
                          pipeline=pipeline, lookup=False, drafter_timeout_s=30.0)
    events = list(v._segment(spec("s-1")))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and "drafter_unavailable" not in kinds, events[-1]
    done = events[-1][1]
    assert done.token_ids == ref.token_ids
    assert [t for k, s in events[:-1] for t in s.new_token_ids] == ref.token_ids
    assert done.accept_lengths and done.timings["draft"] > 0
    if pipeline:
        assert done.extra["pipeline_hits"] + done.extra["pipeline_misses"] > 0
    assert "s-1" not in v.local_drafter.backend._caches  # released at the end

    async def streamed():  # Verifier.decode: batches of these events, the loop in a thread
        return [e async for batch in v.decode(spec("s-3")) for e in batch]
    events = asyncio.run(streamed())
    assert events[-1][0] == "done" and events[-1][1].token_ids == ref.token_ids
    assert [t for k, s in events[:-1] for t in s.new_token_ids] == ref.token_ids

    async def one_reply():  # a non-streamed request's segment: every event in ONE batch
        from dataclasses import replace

        return [batch async for batch in v.decode(replace(spec("s-4"), streamed=False))]
    batches = asyncio.run(one_reply())
    assert len(batches) == 1 and batches[0][-1][0] == "done", [len(b) for b in batches]
    assert batches[0][-1][1].token_ids == ref.token_ids
    assert [t for k, s in batches[0][:-1] for t in s.new_token_ids] == ref.token_ids
    assert len(batches[0]) > 2  # the steps came with the result, not only the result
    plain = Verifier(str(tiny_checkpoints["target"]), device="cpu",
                     feature_layers=check_models(cfg))
    with pytest.raises(ValueError, match="holds no drafter"):
        list(plain._segment(spec("s-2", 8)))
