"""The Serve app with the vLLM Verifier (`verifier_backend: vllm`), real local Ray, the official
`openai` client: the same text and token ids as in-process torch AR decoding.

One app, one vLLM engine (in the Verifier replica). When the session already runs Ray and Serve
(tests/deployments/service's session fixture), this app is deployed beside it under its own route prefix;
otherwise Ray is started here as tests/deployments/service/conftest.py does it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tiny_models import REPO

# vLLM missing: a failure, not a skip (tests/deer_serve/vllm/conftest.py)
pytest.importorskip("ray")
pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.service]

APP, PREFIX = "deer-vllm", "/vllm"
PROMPTS = ["def fibonacci(n):\n    ", "import os\n\n\ndef list_files(path):\n"]
MAX_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_service():
    import ray
    from ray import serve

    from deer_serve.assets import default_paths, is_checkpoint
    from deployments.app import build_app

    target, drafter = default_paths()
    if not (is_checkpoint(target) and is_checkpoint(drafter)):
        pytest.skip("the embedded model pair is missing")
    own = not ray.is_initialized()
    if own:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
        pythonpath = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]]
                                                    if os.environ.get("PYTHONPATH") else []))
        for i in range(3):  # as tests/deployments/service/conftest.start_ray: a loaded machine starts slowly
            try:
                ray.init(address="local", num_cpus=4, include_dashboard=False,
                         object_store_memory=256 << 20, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": pythonpath,
                                                   "OMP_NUM_THREADS": "1"}})
                break
            except Exception:
                ray.shutdown()
                if i == 2:
                    raise
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    from ray.serve.context import _get_global_client

    port = _get_global_client().http_config.port
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    config = {"target_path": str(target), "drafter_path": str(drafter), "device": "cpu",
              "block_size": 8, "limits": {"max_tokens": 256}, "verifier_backend": "vllm",
              "drafter": small, "verifier": small, "router": small}
    try:
        serve.run(build_app(config), name=APP, route_prefix=PREFIX)
        yield f"http://127.0.0.1:{port}{PREFIX}", Path(str(target)).name, str(target)
    finally:
        try:
            serve.delete(APP)
        finally:
            if own:
                serve.shutdown()
                ray.shutdown()


def test_openai_client_gets_torch_ar_text_from_vllm_verifier(vllm_service):
    import openai
    from transformers import AutoTokenizer

    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams

    url, model, target_path = vllm_service
    tok = AutoTokenizer.from_pretrained(target_path)
    ref_target = HFTarget.from_pretrained(target_path, device="cpu")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    for prompt in PROMPTS:
        ref = generate(ref_target, None, tok.encode(prompt, add_special_tokens=False),
                       SamplingParams(max_new_tokens=MAX_TOKENS), mode="ar",
                       detokenize=lambda ids: tok.decode(ids, skip_special_tokens=True))
        r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0)
        c = r.choices[0]
        assert c.text == ref.text
        assert c.token_ids == ref.token_ids  # token_ids: deer-serve's extension
        deer = r.model_extra["deer"]
        assert deer["fallback"] is False and deer["cycles"] >= 1
    # the Verifier answering is the vLLM one
    from ray import serve

    info = serve.get_deployment_handle("Verifier", app_name=APP).meta.remote().result(timeout_s=60)
    assert info["backend"] == "VLLMTarget" and info["vocab_size"] == ref_target.vocab_size
