"""The Serve app end to end: real Ray, real Serve, the official `openai` client, a gRPC stub
from the repo's generated code. Greedy output through the service must be token-for-token the
in-process plain AR decoding of the same target."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest

from deer_serve.engine import generate
from deer_serve.protos import deer_pb2, deer_pb2_grpc
from deer_serve.targets.hf import HFTarget
from deer_serve.types import SamplingParams

pytestmark = pytest.mark.service

PROMPTS = ["def add(a, b):\n", "for i in range(10):"]
MAX_TOKENS = 24
META = (("application", "deer"),)


@pytest.fixture(scope="module")
def reference(service):
    """prompt -> in-process greedy AR GenerationResult (ids as the service tokenizes them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(service.target_path)
    target = HFTarget.from_pretrained(service.target_path, device="cpu")
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    greedy = SamplingParams(max_new_tokens=MAX_TOKENS)
    # tokenized and decoded as `deer-serve generate` does
    return {p: generate(target, None, tokenizer.encode(p, add_special_tokens=False), greedy,
                        mode="ar", detokenize=decode) for p in PROMPTS}


@pytest.fixture(scope="module")
def client(service):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=service.http + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.grpc) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield deer_pb2_grpc.DeerServiceStub(channel)


def post(service, path: str, body, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(service.http + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(service, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(service.http + path, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def check_deer(deer: dict, fallback: bool = False):
    assert set(deer) >= {"accept_lengths", "mean_accepted", "cycles", "fallback"}
    assert deer["fallback"] is fallback
    assert deer["cycles"] >= 1 and all(0 <= a <= 4 for a in deer["accept_lengths"])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_openai_completion_equals_inprocess_ar(service, client, reference, prompt):
    ref = reference[prompt]
    r = client.completions.create(model=service.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0)
    c = r.choices[0]
    assert c.text == ref.text and c.token_ids == ref.token_ids  # token_ids: our extension
    assert c.finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)
    check_deer(r.model_extra["deer"])

    text, ids, last = "", [], None
    for chunk in client.completions.create(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, model=service.model):
        for ch in chunk.choices:
            text += ch.text
            ids += ch.token_ids
        last = chunk
    assert text == ref.text and ids == ref.token_ids
    assert last.choices[0].finish_reason == ref.finish_reason
    check_deer(last.model_extra["deer"])


def test_openai_chat_streamed_and_not(service, client):
    msgs = [{"role": "user", "content": "write a loop"}]
    r = client.chat.completions.create(model=service.model, messages=msgs, max_tokens=12)
    assert r.choices[0].message.role == "assistant"
    check_deer(r.model_extra["deer"])
    parts = [c for c in client.chat.completions.create(messages=msgs, max_tokens=12, stream=True,
                                                       model=service.model)]
    text = "".join(ch.delta.content or "" for c in parts for ch in c.choices)
    assert text == r.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_sampled_requests_repeat_with_a_seed(service, client):
    kw = dict(model=service.model, prompt=PROMPTS[0], max_tokens=16, temperature=0.9, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].token_ids == b.choices[0].token_ids


def test_completion_equals_the_cli_generate_ar(service, client, tmp_path):
    """The issue's literal check: the text of `deer-serve generate --mode ar`."""
    import subprocess
    import sys

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = subprocess.run([sys.executable, "-m", "deer_serve", "generate", "--prompts", str(prompts),
                          "--mode", "ar", "--max-new-tokens", str(MAX_TOKENS), "--temperature",
                          "0", "--target", service.target_path, "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cli = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(cli) == len(PROMPTS)
    for prompt, want in zip(PROMPTS, cli):
        r = client.completions.create(model=service.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0)
        assert r.choices[0].text == want["text"]
        assert r.choices[0].token_ids == want["token_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_grpc_generate_and_stream_equal_inprocess_ar(stub, reference, prompt):
    ref = reference[prompt]
    req = deer_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
    r = stub.Generate(req, metadata=META, timeout=120)
    assert r.text == ref.text and list(r.token_ids) == ref.token_ids
    assert r.finish_reason == ref.finish_reason and not r.deer.fallback and r.deer.cycles >= 1
    chunks = list(stub.GenerateStream(req, metadata=META, timeout=120))
    assert "".join(c.text for c in chunks) == ref.text
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert chunks[-1].finish_reason == ref.finish_reason and chunks[-1].deer.cycles >= 1


def test_drafter_and_verifier_are_separate_actors_on_separate_gpus(service):
    from ray import serve

    d = serve.get_deployment_handle("Drafter", app_name="deer").info.remote().result(timeout_s=60)
    v = serve.get_deployment_handle("Verifier", app_name="deer").info.remote().result(timeout_s=60)
    assert d["role"] == "drafter" and v["role"] == "verifier"
    assert d["pid"] != v["pid"] and d["actor_id"] != v["actor_id"]
    assert d["actor_id"] and v["actor_id"]
    assert len(d["gpu_ids"]) == 1 and len(v["gpu_ids"]) == 1  # each declared num_gpus: 1
    assert d["gpu_ids"] != v["gpu_ids"]


def test_sse_wire_format(service):
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 5, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(service.http + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    n = sum(len(c["choices"][0].get("token_ids", [])) for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == n
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert "deer" in chunks[-2]


def test_models_and_health(service):
    status, body = get(service, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [service.model]
    status, body = get(service, "/healthz")
    assert status == 200 and body["status"] == "ok" and body["drafter"]["ok"]


def check_error(status: int, body: dict, want: int):
    assert status == want, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]


BAD_HTTP = [
    (b'{"prompt": "x", "max_tokens": ', 400),                          # bad JSON
    (b'[1, 2]', 400),                                                  # not an object
    ({"prompt": "x", "max_tokens": "many"}, 422),                      # wrong type
    ({"prompt": 5}, 422),
    ({"prompt": "x", "temperature": "hot"}, 422),
    ({"max_tokens": 4}, 422),                                          # no prompt
    ({"prompt": "x", "max_tokens": 0}, 400),                           # max_tokens < 1
    ({"prompt": "x", "max_tokens": 100000}, 400),                      # over the limit
    ({"prompt": "x", "temperature": -0.5}, 400),                       # temperature < 0
    ({"prompt": "x", "top_p": 0}, 400),
    ({"prompt": "x", "block_size": 65}, 400),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"prompt": "x", "mode": "fast"}, 400),
    ({"prompt": "x", "model": "gpt-4"}, 404),                          # unknown model
    ({"prompt": [999999]}, 400),                                       # token id out of vocab
]


def test_invalid_http_requests_get_openai_errors_and_the_server_keeps_serving(service, client):
    for body, want in BAD_HTTP:
        status, err = post(service, "/v1/completions", body, raw=isinstance(body, bytes))
        check_error(status, err, want)
    status, err = post(service, "/v1/chat/completions", {"messages": "hi"})
    check_error(status, err, 422)
    status, err = post(service, "/v1/chat/completions", {"messages": [{"role": "user"}],
                                                         "temperature": -1})
    check_error(status, err, 400)
    status, err = get(service, "/v1/nothing")
    check_error(status, err, 404)
    # the official client raises its typed errors on these
    import openai
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=service.model, prompt="x", max_tokens=0)
    r = client.completions.create(model=service.model, prompt="x", max_tokens=3)
    assert len(r.choices[0].token_ids) >= 1


def test_invalid_grpc_requests_get_invalid_argument_and_the_server_keeps_serving(stub):
    bad = [deer_pb2.GenerateRequest(prompt="x", max_tokens=0),
           deer_pb2.GenerateRequest(prompt="x", temperature=-1.0),
           deer_pb2.GenerateRequest(prompt="x", top_p=0.0),
           deer_pb2.GenerateRequest(prompt="x", block_size=0),
           deer_pb2.GenerateRequest(prompt="x", mode="fast"),
           deer_pb2.GenerateRequest(prompt="x", model="gpt-4"),
           deer_pb2.GenerateRequest(prompt="")]
    for req in bad:
        # each lambda is called at once, in this iteration: the late binding of `req` is safe
        for call in (lambda: stub.Generate(req, metadata=META, timeout=60),  # noqa: B023
                     lambda: list(stub.GenerateStream(req, metadata=META, timeout=60))):  # noqa: B023
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
            assert e.value.details()
    r = stub.Generate(deer_pb2.GenerateRequest(prompt="x", max_tokens=3), metadata=META, timeout=60)
    assert len(r.token_ids) >= 1


def test_grpc_health_service(service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(service.grpc) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), metadata=META,
                                                 timeout=60)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
