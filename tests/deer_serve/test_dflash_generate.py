"""A DFlash-format drafter through `deer-serve generate` and the engine: greedy `deer` == `ar`
token for token, pipelining and batching included; bad checkpoints exit 2 with a message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from deer_serve import cli
from deer_serve.drafters import drafter_format, load_drafter
from deer_serve.engine import generate
from deer_serve.targets.hf import HFTarget
from deer_serve.types import SamplingParams

from tiny_models import REPO


def gen(ckpt, mode, *extra):
    return ["generate", "--target", str(ckpt["target"]), "--drafter", str(ckpt["drafter-dflash"]),
            "--mode", mode, "--max-new-tokens", "32", "--ignore-eos", "--device", "cpu",
            "--temperature", "0", "--json", *extra]


def test_format_detected(tiny_checkpoints):
    assert drafter_format(tiny_checkpoints["drafter-dflash"]) == "dflash"
    assert drafter_format(tiny_checkpoints["drafter-target-features"]) == "deer"


@pytest.mark.parametrize("k", ["4", "16"])
def test_generate_cli_deer_equals_ar(tiny_checkpoints, tmp_path, k):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ("def add(a, b):", "import os\nimport", "class Point:")))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = {}
    for mode, extra in (("deer", ["--block-size", k, "--lookup", "off"]), ("ar", [])):
        proc = subprocess.run([sys.executable, "-m", "deer_serve", *gen(tiny_checkpoints, mode, *extra),
                               "--prompts", str(prompts)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out[mode] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out["deer"]) == 3
    for d, a in zip(out["deer"], out["ar"]):
        assert d["token_ids"] == a["token_ids"] and len(d["token_ids"]) == 32
        assert d["accept_lengths"] and all(0 <= n <= int(k) for n in d["accept_lengths"])


def test_engine_pipelined_and_batched_rows(tiny_checkpoints):
    """Pipelined pre-drafts (a prefix in the block) and ragged batches keep greedy exact."""
    drafter = load_drafter(tiny_checkpoints["drafter-dflash"], tiny_checkpoints["target"], device="cpu")
    target = HFTarget.from_pretrained(str(tiny_checkpoints["target"]), device="cpu",
                                      feature_layers=drafter.feature_layers)
    sp = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    for prompt in ([5, 9, 33, 2], [17] * 9):
        ar = generate(target, None, prompt, sp, mode="ar").token_ids
        for pipe in (False, True):
            r = generate(target, drafter, prompt, sp, mode="deer", block_size=6, pipeline=pipe)
            assert r.token_ids == ar
    # draft_batch rows equal single draft calls
    ctxs = [[5, 9, 33, 2, 8], [17] * 11, [40, 41]]
    feats = [target.score(f"s{i}", c, 1, return_hidden=True, n_hidden=len(c)).hidden
             for i, c in enumerate(ctxs)]
    single = [drafter.draft(f"a{i}", c, 3, 5, sp, context_hidden=f).tokens
              for i, (c, f) in enumerate(zip(ctxs, feats))]
    batch = drafter.draft_batch([f"b{i}" for i in range(3)], ctxs, [3, 3, 3], 5, [sp] * 3,
                                context_hiddens=feats)
    for s, b in zip(single, batch):
        assert torch.equal(s, b.tokens)


def test_sampled_run_repeats_with_seed(tiny_checkpoints):
    drafter = load_drafter(tiny_checkpoints["drafter-dflash"], tiny_checkpoints["target"], device="cpu")
    target = HFTarget.from_pretrained(str(tiny_checkpoints["target"]), device="cpu",
                                      feature_layers=drafter.feature_layers)
    sp = SamplingParams(temperature=0.8, max_new_tokens=24, ignore_eos=True, seed=11)
    a = generate(target, drafter, [5, 9, 33], sp, mode="deer", block_size=4)
    b = generate(target, drafter, [5, 9, 33], sp, mode="deer", block_size=4)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c["dflash_config"].update(target_layer_ids=[0, 7]), "past the target's depth"),
    (lambda c: (c["dflash_config"].pop("target_layer_ids"), c.pop("num_target_layers")),
     "names no target_layer_ids"),
    (lambda c: c.update(hidden_size=32), "hidden size"),
])
def test_bad_dflash_checkpoint_exits_2(tiny_checkpoints, tmp_path, capsys, edit, msg):
    d = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["drafter-dflash"], d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    args = ["generate", "--target", str(tiny_checkpoints["target"]), "--drafter", str(d),
            "--device", "cpu", "def f():"]
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
