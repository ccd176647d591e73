"""The default config (`cluster/serve_config.yaml`: `loop: vllm`) under Ray Serve's
throughput-optimized mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in the environment of `deer-serve
serve`, so of the Ray it starts: user code and the handle's router on each replica's main loop,
gRPC between replicas, direct ingress). The default config's replica is its own ingress
(`service.ingress: verifier`): the Router's code reads each segment from the replica's own vLLM
loop in its event loop (`deployments.session.arun_session`), which this mode needs: a blocking
iterator inside the replica's loop failed every request ("Sync methods should not be called
from within an `asyncio` event loop") on the session's earlier worker-thread path.

`deer-serve serve` as a user runs it, in its own session; the mode is on (Serve's controller
says so in the log); concurrent streamed requests through the `openai` client and a streamed
and a unary call through the generated gRPC stub give the token ids and text of in-process
plain AR decoding.
"""

from __future__ import annotations

import os
import threading

import pytest

from serve_process import REPO, free_port, serve_process
from test_vllm_engine_loop import PROMPTS, ar_reference

pytest.importorskip("ray")
pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.service]

MAX_TOKENS = 32
START_DEADLINE_S = 420.0
STOP_TIMEOUT_S = 120.0
DEADLINE_S = 300.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("throughput-mode") / "serve.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_SERVE_THROUGHPUT_OPTIMIZED="1", OMP_NUM_THREADS="1",
               RAY_agent_register_timeout_ms="180000")
    url = f"http://127.0.0.1:{http_port}"
    with serve_process(["--config", str(REPO / "cluster/serve_config.yaml"), "--port",
                        str(http_port), "--grpc-port", str(grpc_port), "--num-cpus", "4",
                        "--no-dashboard"], url, env, log, START_DEADLINE_S, STOP_TIMEOUT_S):
        yield url, grpc_port, log


@pytest.fixture(scope="module")
def reference():
    from deer_serve.assets import ASSETS_DIR

    return ar_reference(str(ASSETS_DIR / "target"), MAX_TOKENS)


def test_the_default_config_serves_under_the_throughput_optimized_mode(server, reference):
    import grpc
    import openai

    from deer_serve.protos import deer_pb2, deer_pb2_grpc

    url, grpc_port, log = server
    assert "Throughput optimized Ray Serve enabled" in log.read_text(), log.read_text()[-4000:]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                           timeout=DEADLINE_S)
    model = client.models.list().data[0].id
    out: dict = {}
    go = threading.Barrier(len(PROMPTS), timeout=DEADLINE_S)

    def one(i: int, prompt: str):
        try:
            go.wait()
            ids, text = [], ""
            for chunk in client.completions.create(model=model, prompt=prompt, stream=True,
                                                   max_tokens=MAX_TOKENS, temperature=0):
                c = chunk.choices[0]
                text += c.text
                ids += (c.model_extra or {}).get("token_ids") or []
            out[i] = ids, text
        except Exception as e:  # noqa: BLE001 - reported below
            out[i] = e

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(PROMPTS):
        assert not isinstance(out[i], Exception), (log.read_text()[-4000:], out[i])
        ref = reference[prompt]
        assert out[i] == (ref.token_ids, ref.text), i

    prompt = PROMPTS[0]
    ref = reference[prompt]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = deer_pb2_grpc.DeerServiceStub(ch)
        md = (("application", "deer"),)
        req = deer_pb2.GenerateRequest(prompt=prompt, max_tokens=MAX_TOKENS)
        r = stub.Generate(req, metadata=md, timeout=DEADLINE_S)
        assert list(r.token_ids) == ref.token_ids and r.text == ref.text
        chunks = list(stub.GenerateStream(req, metadata=md, timeout=DEADLINE_S))
        assert [i for c in chunks for i in c.token_ids] == ref.token_ids
        assert "".join(c.text for c in chunks) == ref.text
