"""What the service builds and sends, checked on the live app against the parts it is made of:

- chat: the prompt token ids a chat request becomes are exactly the tokenizer's
  `apply_chat_template(messages, add_generation_prompt=True)` (a system message, a multi-turn
  conversation), read from the Router replica itself and seen in the usage and the greedy
  completion over HTTP; without a template, the documented plain transcript;
- stop strings while streaming (HTTP with the `openai` client, gRPC GenerateStream): no chunk
  carries the stop string, the streamed text ends right before it, finish_reason is "stop", and
  the streamed text equals the non-streamed completion with the same stop;
- gRPC status codes UNAVAILABLE (the verifier's deployment is gone) and INTERNAL (a Router wired
  to a deployment that is not a verifier), each followed by a request that is served;
- `deer-serve load` against a Router of its own: its token and request counts equal the
  server's metrics, no errors; against a port nobody listens on: counted connection errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from deer_serve.protos import deer_pb2, deer_pb2_grpc
from ops_app import delete, deploy, http, metrics_port, scrape

pytestmark = pytest.mark.service

DEADLINE_S = 120.0  # how long a test waits for a condition before it fails
SYSTEM = {"role": "system", "content": "You write short Python functions."}
CONVERSATIONS = {
    "system+user": [SYSTEM, {"role": "user", "content": "def add(a, b):"}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "for i in range(10):"},
                   {"role": "assistant", "content": "    print(i)"},
                   {"role": "user", "content": "class Point:"}],
    "user only": [{"role": "user", "content": "import os"}],
}
# ChatML, as Qwen's tokenizers carry it (the tiny tokenizer has no template of its own)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def wait_until(cond, what: str, poll: float = 0.2):
    t_end = time.monotonic() + DEADLINE_S
    while not (v := cond()):
        assert time.monotonic() < t_end, f"timed out waiting for {what}"
        time.sleep(poll)
    return v


def greedy_ar(target_path: str, ids: list[int], n: int) -> list[int]:
    """The target's plain greedy continuation of token ids, in-process."""
    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams

    target = HFTarget.from_pretrained(target_path, device="cpu")
    return generate(target, None, ids, SamplingParams(max_new_tokens=n), mode="ar").token_ids


def template_ids(tok, msgs) -> list[int]:
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# ---- chat template ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_app(service, tmp_path_factory):
    """A Router over the session's models whose tokenizer carries a chat template."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat-tokenizer")
    tok = AutoTokenizer.from_pretrained(service.target_path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    a = deploy(service, "chat", own_models=False, tokenizer_path=str(d))
    try:
        yield a, AutoTokenizer.from_pretrained(str(d))
    finally:
        delete(a)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_a_chat_prompt_is_the_tokenizers_chat_template(service, chat_app, name):
    import openai

    app, tok = chat_app
    msgs = CONVERSATIONS[name]
    want = template_ids(tok, msgs)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and all(m["content"] in text for m in msgs)
    # the ids the Router replica builds for the request (the same `prepare` every request takes)
    p = app.handle("Router").prepare.remote({"messages": msgs, "max_tokens": 8},
                                            "chat").result(timeout_s=60)
    assert p.prompt_ids == want, name
    # and over HTTP: the prompt's length in the usage, and greedy decoding continues exactly
    # those ids
    client = openai.OpenAI(base_url=app.http + "/v1", api_key="unused", max_retries=0,
                           timeout=DEADLINE_S)
    r = client.chat.completions.create(model=app.model, messages=msgs, max_tokens=8,
                                       temperature=0)
    assert r.usage.prompt_tokens == len(want)
    assert r.choices[0].token_ids == greedy_ar(service.target_path, want, 8)


def test_without_a_template_a_chat_is_a_plain_transcript(service):
    """The session's tokenizer has no chat template: the prompt is "role: content" lines ending
    in the assistant's turn (deployments/text.py)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(service.target_path)
    assert not getattr(tok, "chat_template", None)
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name="deer")
    msgs = CONVERSATIONS["multi-turn"]
    p = router.prepare.remote({"messages": msgs}, "chat").result(timeout_s=60)
    transcript = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
    assert p.prompt_ids == tok.encode(transcript, add_special_tokens=False)


# ---- stop strings while streaming -------------------------------------------------------------

STOP_PROMPT = "def add(a, b):\n"
STOP_MAX = 48
# sampled with a seed (reproducible): the tiny random target's greedy text repeats one token
SAMPLING = {"temperature": 1.0, "seed": 7}


@pytest.fixture(scope="module")
def stops(service):
    """(full text, [(stop, text before it)]): stop strings of 1, 2 and 4 characters at places
    spread over the text, each cut at its first occurrence."""
    status, body, _ = http("POST", service.http + "/v1/completions",
                           {"prompt": STOP_PROMPT, "max_tokens": STOP_MAX, **SAMPLING})
    assert status == 200, body
    full = body["choices"][0]["text"]
    assert len(full) >= 30, full
    out = []
    for frac, n in ((0.3, 2), (0.5, 4), (0.8, 1)):
        i = int(len(full) * frac)
        while i < len(full) - n and not full[i:i + n].strip():
            i += 1
        stop = full[i:i + n]
        assert stop.strip(), full
        out.append((stop, full[:full.find(stop)]))
    return full, out


def test_stop_strings_while_streaming_over_http(service, stops):
    import openai

    client = openai.OpenAI(base_url=service.http + "/v1", api_key="unused", max_retries=0,
                           timeout=DEADLINE_S)
    full, cases = stops
    for stop, before in cases:
        ns = client.completions.create(model=service.model, prompt=STOP_PROMPT,
                                       max_tokens=STOP_MAX, stop=[stop], **SAMPLING)
        assert ns.choices[0].text == before and ns.choices[0].finish_reason == "stop", stop
        chunks, finish = [], []
        for c in client.completions.create(model=service.model, prompt=STOP_PROMPT,
                                           max_tokens=STOP_MAX, stop=[stop], stream=True,
                                           **SAMPLING):
            for ch in c.choices:
                chunks.append(ch.text)
                if ch.finish_reason:
                    finish.append(ch.finish_reason)
        assert not any(stop in t for t in chunks), (stop, chunks)
        assert "".join(chunks) == before == ns.choices[0].text, (stop, chunks)
        assert full.startswith("".join(chunks) + stop)  # it ends right before the stop string
        assert finish == ["stop"], finish
        assert sum(bool(t) for t in chunks) >= 2 or len(before) <= 4, chunks  # really streamed


def test_stop_strings_while_streaming_over_grpc(service, stops):
    full, cases = stops
    with grpc.insecure_channel(service.grpc) as ch:
        stub = deer_pb2_grpc.DeerServiceStub(ch)
        md = (("application", "deer"),)
        for stop, before in cases:
            req = deer_pb2.GenerateRequest(prompt=STOP_PROMPT, max_tokens=STOP_MAX,
                                           stop=[stop], **SAMPLING)
            ns = stub.Generate(req, metadata=md, timeout=DEADLINE_S)
            assert ns.text == before and ns.finish_reason == "stop", stop
            chunks = list(stub.GenerateStream(req, metadata=md, timeout=DEADLINE_S))
            texts = [c.text for c in chunks]
            assert not any(stop in t for t in texts), (stop, texts)
            assert "".join(texts) == before == ns.text, (stop, texts)
            assert full.startswith("".join(texts) + stop)
            assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
            assert chunks[-1].finish_reason == "stop"


# ---- gRPC status codes -----------------------------------------------------------------------

def grpc_ok(stub, md) -> None:
    r = stub.Generate(deer_pb2.GenerateRequest(prompt="def f(x):\n", max_tokens=4),
                      metadata=md, timeout=DEADLINE_S)
    assert len(r.token_ids) == 4 and r.finish_reason == "length", r
    chunks = list(stub.GenerateStream(deer_pb2.GenerateRequest(prompt="def f(x):\n",
                                                               max_tokens=4),
                                      metadata=md, timeout=DEADLINE_S))
    assert chunks[-1].finish_reason == "length"
    assert [i for c in chunks for i in c.token_ids] == list(r.token_ids)


def grpc_fails(stub, md, code) -> None:
    req = deer_pb2.GenerateRequest(prompt="def f(x):\n", max_tokens=4)
    for call in (lambda: stub.Generate(req, metadata=md, timeout=DEADLINE_S),
                 lambda: list(stub.GenerateStream(req, metadata=md, timeout=DEADLINE_S))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code, (e.value.code(), e.value.details())


def test_grpc_unavailable_when_the_verifier_is_gone_then_served_again(service):
    """A Router over the models of another app; that app is deleted (its Verifier and Drafter
    are gone): UNAVAILABLE (the drafter's failure falls back to AR, the verifier's spends the
    resumes), with retry-after; the session app answers on the same channel meanwhile; the
    models' app deployed again: the same Router serves again."""
    from ray import serve

    models = deploy(service, "models-gone")
    router = deploy(service, "over-gone", own_models=False,
                    models_from=("models-gone", "Drafter", "Verifier"),
                    verifier_timeout_s=10.0, drafter_timeout_s=10.0,
                    service={"verifier_resumes": 1, "verifier_resume_window_s": 5.0,
                             "retry_after_s": 3})
    try:
        with grpc.insecure_channel(service.grpc) as ch:
            stub = deer_pb2_grpc.DeerServiceStub(ch)
            grpc_ok(stub, router.metadata)              # the Router has met the verifier
            serve.delete(models.name)
            grpc_fails(stub, router.metadata, grpc.StatusCode.UNAVAILABLE)
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(deer_pb2.GenerateRequest(prompt="x", max_tokens=2),
                              metadata=router.metadata, timeout=DEADLINE_S)
            assert dict(e.value.trailing_metadata() or ()).get("retry-after") == "3"
            grpc_ok(stub, (("application", "deer"),))   # the service still serves
            deploy(service, "models-gone")               # the verifier is back
            wait_until(lambda: _serves(stub, router.metadata), "the Router to serve again",
                       poll=1.0)
            grpc_ok(stub, router.metadata)
        state = router.handle("Router").ops_state.remote().result(timeout_s=30)
        assert state["active"] == 0 and state["resumed"] >= 1, state
    finally:
        delete(router)
        delete(models)


def _serves(stub, md) -> bool:
    try:
        stub.Generate(deer_pb2.GenerateRequest(prompt="x", max_tokens=2), metadata=md,
                      timeout=DEADLINE_S)
        return True
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
        return False


def test_grpc_internal_on_a_server_fault_and_the_next_request_is_served(service):
    """No client input reaches INTERNAL (every field is checked first). A server fault does: a
    Router whose `verifier` handle is a Drafter deployment (its meta has no eos_token_id) fails
    inside the decode with a KeyError. The caller gets INTERNAL with a generic message (no
    internals leaked); the same Router answers the next request the same way (not wedged), and
    the service serves on the same channel."""
    miswired = deploy(service, "miswired", own_models=False,
                      models_from=("deer", "Drafter", "Drafter"))
    try:
        with grpc.insecure_channel(service.grpc) as ch:
            stub = deer_pb2_grpc.DeerServiceStub(ch)
            for _ in range(2):
                grpc_fails(stub, miswired.metadata, grpc.StatusCode.INTERNAL)
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(deer_pb2.GenerateRequest(prompt="x", max_tokens=2),
                              metadata=miswired.metadata, timeout=DEADLINE_S)
            assert e.value.details() == "internal server error"
            grpc_ok(stub, (("application", "deer"),))
        status, body, _ = http("POST", miswired.http + "/v1/completions",
                               {"prompt": "x", "max_tokens": 2})
        assert status == 500 and body["error"]["message"], body
        state = miswired.handle("Router").ops_state.remote().result(timeout_s=30)
        assert state["active"] == 0, state
    finally:
        delete(miswired)


# ---- deer-serve load -----------------------------------------------------------------------

def load(*args: str, out: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "deer_serve", "load", *args, "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    got = json.loads(out.read_text())
    assert json.loads(p.stdout) == got
    return got


def metric_sum(text: str, name: str, app: str, tag: str = "") -> float:
    """The sum of a counter's series for one app (Prometheus text; the name with or without
    `_total`)."""
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.split("{", 1)[0] in (name, name + "_total")
               and f'application="{app}"' in ln and tag in ln)


def test_deer_serve_load_counts_what_the_server_served(service, tmp_path):
    a = deploy(service, "load", own_models=False)
    try:
        got = load("--url", a.http, "--concurrency", "2", "--duration", "3", "--max-tokens", "8",
                   "--model", a.model, out=tmp_path / "load.json")
        assert got["errors"] == 0 and got["error_kinds"] == {}, got
        assert got["requests"] == got["requests_ok"] >= 2, got
        # every request ran to max_tokens (no stop) or to the target's end-of-text token
        assert 0 < got["tokens"] <= 8 * got["requests"]
        assert got["tokens_per_request"]["max"] <= 8
        assert got["latency_s"]["p50"] > 0 and got["ttft_s"]["p50"] <= got["latency_s"]["max"]
        # the server's own counts (Ray metrics of this app's Router), once exported
        port = metrics_port()

        def counted():
            text = scrape(port)
            n_tok = metric_sum(text, "ray_deer_tokens_generated", a.name)
            n_req = metric_sum(text, "ray_deer_requests", a.name, 'protocol="http"')
            return (n_tok, n_req) if n_req >= got["requests"] and n_tok >= got["tokens"] else None
        n_tok, n_req = wait_until(counted, "the server's metrics", poll=2.0)
        assert (n_tok, n_req) == (got["tokens"], got["requests"])
    finally:
        delete(a)


def test_deer_serve_load_counts_connection_errors(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    got = load("--url", f"http://127.0.0.1:{port}", "--concurrency", "2", "--duration",
               "0.5", out=tmp_path / "bad.json")
    assert got["requests"] >= 2 and got["errors"] == got["requests"], got
    assert got["requests_ok"] == 0 and got["tokens"] == 0
    assert got["error_kinds"] == {"ConnectError": got["requests"]}, got
    assert got["latency_s"]["p50"] is None and got["throughput_tokens_per_s"] == 0
