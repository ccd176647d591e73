"""`deer-serve train drafter` on targets that are not Qwen3 (issue 19): a tiny random Llama with
its own tokenizer and mask token, and a tiny random GPT-2 whose tokenizer has no mask token
(spare embedding rows), each with a DeerDrafter and a DFlash-format drafter, smoke-sized; then
`deer-serve generate --mode deer --temperature 0` equals `--mode ar` token for token with each.
A second test (marked service) serves one pair through the Ray Serve app (`build_app`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from any_targets import make_gpt2, make_llama, write_prompts
from budget import Budget

from deer_serve.cli import run as cli_run

pytestmark = pytest.mark.slow

SMOKE = ["--prompt-len", "16", "--gen-len", "24", "--block-size", "8", "--batch-size", "4",
         "--block-tokens", "27", "--eval-blocks", "16", "--teacher-batch-size", "8",
         "--threads", "1"]
PROMPTS = ["def add(a, b):\n", "class Point:", "x = 1"]
MAX_NEW = 32
# (target, arch, how the D2A steps are chosen): the Llama run fits itself into a budget
RUNS = [("llama", "deer", ["--minutes", "0.25"]),
        ("llama", "dflash", ["--stage1-steps", "4", "--stage2-steps", "8"]),
        ("gpt2", "deer", ["--stage1-steps", "4", "--stage2-steps", "8"]),
        ("gpt2", "dflash", ["--stage1-steps", "4", "--stage2-steps", "8"])]


# the time of the first test that uses `trained` (its fixture's time counts towards it): its
# subprocesses get what is left of it
budget = {"first_test": Budget()}


def deer_serve_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "deer-serve"      # the installed console script
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "deer_serve"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{(target, arch): (target_dir, OUT)}: each drafter trained by the command."""
    budget["first_test"] = Budget()
    root = tmp_path_factory.mktemp("anytarget")
    targets = {"llama": make_llama(root / "llama"), "gpt2": make_gpt2(root / "gpt2")}
    prompts = write_prompts(root / "prompts.jsonl")
    out = {}
    for i, (name, arch, steps) in enumerate(RUNS):
        o = root / f"{name}-{arch}"
        args = ["train", "drafter", "--target", str(targets[name]), "--prompts", str(prompts),
                "--out", str(o), "--arch", arch, *steps, *SMOKE]
        if i == 0:   # the command itself, as a user runs it
            env = dict(os.environ, OMP_NUM_THREADS="1")
            p = subprocess.run(deer_serve_cmd() + args, capture_output=True, text=True,
                               timeout=budget["first_test"].left(), env=env)
            assert p.returncode == 0, p.stderr[-4000:]
            assert "Traceback" not in p.stderr
        else:        # the same entry point in this process (no second interpreter start-up)
            assert cli_run(args) == 0
        out[(name, arch)] = (targets[name], o)
    return out


def generate(target: Path, drafter: Path, mode: str, tmp: Path, subprocess_: bool = False) -> list:
    prompts = tmp / "gen.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    args = ["generate", "--target", str(target), "--drafter", str(drafter), "--mode", mode,
            "--temperature", "0", "--json", "--prompts", str(prompts), "--max-new-tokens",
            str(MAX_NEW), "--block-size", "8", "--ignore-eos", "--device", "cpu"]
    if subprocess_:
        p = subprocess.run(deer_serve_cmd() + args, capture_output=True, text=True,
                           timeout=budget["first_test"].left())
        assert p.returncode == 0, p.stderr[-3000:]
        stdout = p.stdout
    else:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cli_run(args) == 0
        stdout = buf.getvalue()
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def check_plan(plan: dict, c: dict, minutes: float) -> None:
    """The --minutes planner's arithmetic, from what it wrote to OUT/plan.json: the run it
    planned (and the run did: `c`, the D2A config in metrics.json), costed at the per-step,
    evaluation, checkpoint and load times it measured in this run, fits the budget that was
    left after the measurement, and one step more would not fit its planning margin (so the
    step counts come from the budget, not from a default). The clock is read only by the
    planner's measurement; nothing here compares a wall-clock time with the budget."""
    from deer_serve.training.drafter_cli import SAFETY

    p, m = plan["plan"], plan["measured"]
    assert plan["minutes"] == minutes
    assert (c["stage1_steps"], c["stage2_steps"]) == (p["stage1_steps"], p["stage2_steps"])
    # Stage I is round(total / 4) (half to even), so Stage II = total - s1 >= 3 * s1 - 2
    # (total 1702: 426 + 1276)
    assert c["stage1_steps"] >= 1 and c["stage2_steps"] >= 3 * c["stage1_steps"] - 2
    left = minutes * 60 - m["spent_s"]  # after timing the run

    def cost(steps: int) -> float:
        """Seconds of a run of `steps` steps at the measured costs: a second load, two saves,
        the planned evaluations, the steps with their share of the checkpoints."""
        return (m["setup_s"] + 2 * m["save_s"] + p["planned_evals"] * m["eval_s"]
                + steps * (m["step_s"] + m["save_s"] / c["ckpt_every"]))
    total = p["stage1_steps"] + p["stage2_steps"]
    assert cost(total) <= left + 1e-6, (cost(total), left, plan)
    assert cost(total + 1) > SAFETY * left - 1e-6, (cost(total + 1), SAFETY * left, plan)


def test_drafters_for_llama_and_gpt2_decode_losslessly(trained, tmp_path):
    for i, ((name, arch), (target, out)) in enumerate(trained.items()):
        final = out / "final"
        cfg = json.loads((final / "config.json").read_text())
        if arch == "dflash":
            assert cfg["architectures"] == ["DFlashDraftModel"]
        else:
            assert cfg["model_type"] == "deer_drafter"
        # the mask token: Llama's own [MASK] (id 1); GPT-2's first unused row, named <|mask|>
        mask = cfg["dflash_config"]["mask_token_id"] if arch == "dflash" else cfg["mask_token_id"]
        from transformers import AutoTokenizer

        n_tok = len(AutoTokenizer.from_pretrained(str(target)))
        assert mask == (1 if name == "llama" else n_tok), (name, mask)
        if arch == "deer" and name == "gpt2":
            tok = AutoTokenizer.from_pretrained(str(final))
            assert tok.mask_token == "<|mask|>" and tok.mask_token_id == mask
        # the model card, the metrics log, the checkpoint
        card = (final / "README.md").read_text()
        for k in (4, 8, 16):
            assert f"tau k={k}" in card
        assert "held out" in card and "training rows" in card
        metrics = json.loads((final / "metrics.json").read_text())
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        c = metrics["config"]
        assert len(recs) == metrics["steps"] == c["stage1_steps"] + c["stage2_steps"]
        assert (out / "ckpt.pt").is_file() and (out / "teacher.pt").is_file()
        if (name, arch) == ("llama", "deer"):                # --minutes: planned, and it fit
            check_plan(json.loads((out / "plan.json").read_text()), c, minutes=0.25)
        # greedy DEER with the trained drafter == plain AR decoding, token for token
        deer = generate(target, final, "deer", tmp_path, subprocess_=i == 0)
        ar = generate(target, final, "ar", tmp_path)
        assert len(deer) == len(ar) == len(PROMPTS)
        for d, a in zip(deer, ar):
            assert d["token_ids"] == a["token_ids"] and len(a["token_ids"]) == MAX_NEW, (name, arch)
            assert d["text"] == a["text"]
            assert d["cycles"] >= 1 and len(d["accept_lengths"]) >= 1


@pytest.mark.service
def test_a_trained_pair_through_the_serve_app(trained, tmp_path):
    """The GPT-2 target with its DeerDrafter in the Ray Serve app (Drafter, Verifier, Router):
    a greedy completion equals in-process plain AR. Starts its own local Ray unless one is
    running (then it adds an application beside the others)."""
    import urllib.request

    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.app import build_app
    from deer_serve.engine import generate as engine_generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams

    target, out = trained[("gpt2", "deer")]
    repo = Path(__file__).resolve().parents[3]
    started = not ray.is_initialized()
    if started:
        import socket

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pythonpath = os.pathsep.join([str(repo)] + ([os.environ["PYTHONPATH"]]
                                                    if os.environ.get("PYTHONPATH") else []))
        ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False,
                 object_store_memory=128 << 20, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:  # the session's Ray and Serve (tests/deployments/service): its HTTP proxy's port
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
    name = "anytarget"
    small = {"ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0}}
    config = {"target_path": str(target), "drafter_path": str(out / "final"), "device": "cpu",
              "block_size": 8, "limits": {"max_tokens": 64},
              "drafter": small, "verifier": small, "router": small}
    try:
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(target))
        ar_target = HFTarget.from_pretrained(str(target), device="cpu")
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        for prompt in PROMPTS[:2]:
            ref = engine_generate(ar_target, None, tok.encode(prompt, add_special_tokens=False),
                                  SamplingParams(max_new_tokens=24), mode="ar", detokenize=decode)
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/{name}/v1/completions",
                data=json.dumps({"model": Path(target).name, "prompt": prompt,
                                 "max_tokens": 24, "temperature": 0}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                body = json.loads(r.read())
            choice = body["choices"][0]
            assert choice["text"] == ref.text and choice["token_ids"] == ref.token_ids
            assert body["deer"]["fallback"] is False and body["deer"]["cycles"] >= 1
    finally:
        try:
            serve.delete(name)
        finally:
            if started:
                serve.shutdown()
                ray.shutdown()
