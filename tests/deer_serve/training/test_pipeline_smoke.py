"""`deer-serve train --preset smoke`: the whole pipeline end to end, then the pair decodes."""

import json
import subprocess
import sys

import pytest
import torch

from budget import Budget


@pytest.mark.slow
def test_smoke_pipeline_trains_a_pair_that_decodes_losslessly(tmp_path):
    budget = Budget()  # each subprocess: the time this test has left
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "deer_serve", "train", "--preset", "smoke",
                           "--out", str(out), "--export", str(tmp_path / "assets")],
                          capture_output=True, text=True, timeout=budget.left())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for d in ("target", "drafter", "ar-draft"):
        assert (tmp_path / "assets" / d / "model.safetensors").is_file()
    metrics = json.loads((out / "drafter" / "final" / "metrics.json").read_text())
    assert set(metrics["final"]) == {"4", "8", "docstring"} and "after_stage1" in metrics
    assert "after_stage0" in metrics  # the smoke preset runs Stage 0 (raw corpus windows) too
    assert set(metrics["final"]["docstring"]) == {"4", "8"}   # tau on docstring-ended prompts
    assert (out / "drafter" / "stage1" / "model.safetensors").is_file()
    lines = (out / "drafter" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(l) for l in lines]
    assert len(recs) == 15 and all("loss" in r for r in recs)
    assert [r["stage"] for r in recs] == [0] * 3 + [1] * 6 + [2] * 6

    from transformers import AutoTokenizer

    from deer_serve.drafters.deer import DeerDrafterBackend
    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams

    drafter = DeerDrafterBackend.from_pretrained(str(tmp_path / "assets" / "drafter"), device="cpu")
    assert drafter.context_mode == "target-features"
    assert next(drafter.model.parameters()).dtype == torch.float32  # shipped fp16, computed fp32
    target = HFTarget.from_pretrained(str(tmp_path / "assets" / "target"), device="cpu",
                                      feature_layers=drafter.feature_layers)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "assets" / "target"))
    ids = tok("def fibonacci(n):")["input_ids"]
    sp = SamplingParams(max_new_tokens=24)
    ar = generate(target, None, ids, sp, mode="ar")
    deer = generate(target, drafter, ids, sp, mode="deer", block_size=8)
    assert deer.token_ids == ar.token_ids and len(ar.token_ids) > 0

    # the preset's Stage II continuation phases ran after the base drafter, each from the last
    # (the first from the base's float16 export), and the last one is what was exported
    from safetensors.torch import load_file

    v2 = json.loads((out / "drafter-v2" / "final" / "metrics.json").read_text())["config"]
    v3 = json.loads((out / "drafter-v3" / "final" / "metrics.json").read_text())["config"]
    assert v2["init_from"] == str(out / "drafter" / "export-fp16") and v2["stage1_steps"] == 0
    assert v3["init_from"] == str(out / "drafter-v2" / "final") and v3["lr2"] == 3e-4
    assert v2["docstring_rows"] == 4 and v3["docstring_rows"] is None  # a prefix, then all 8
    recs = [json.loads(l) for l in (out / "drafter-v3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == [2, 2]
    shipped = load_file(tmp_path / "assets" / "drafter" / "model.safetensors")
    last = load_file(out / "drafter-v3" / "final" / "model.safetensors")
    assert shipped.keys() == last.keys()
    assert all(torch.equal(shipped[k], last[k].half()) for k in shipped)

    # one command == the chain of commands the phases stand for (the same weights, bit for bit)
    manual = subprocess.run([sys.executable, "-m", "deer_serve", "train", "--preset", "smoke",
                             "--out", str(out), "--stages", "drafter", "--drafter-name", "manual-v2",
                             "--init-from", str(out / "drafter" / "export-fp16"),
                             "--stage0-steps", "0", "--stage1-steps", "0", "--stage2-steps", "3",
                             "--lr2", "4e-4", "--docstring-rows", "4"],
                            capture_output=True, text=True, timeout=budget.left())
    assert manual.returncode == 0, manual.stderr[-3000:]
    assert not (out / "manual-v2-v2").exists()  # D2A flags given: no continuation phases
    # each invocation appends its stages' wall times to out/timing.jsonl
    full, drafter_only = [json.loads(l) for l in (out / "timing.jsonl").read_text().splitlines()]
    assert list(full["stages_s"]) == ["tokenizer", "target", "teacher", "drafter", "drafter-v2",
                                      "drafter-v3", "ar-draft"]
    stages_sum = sum(full["stages_s"].values())
    assert full["preset"] == "smoke" and full["total_s"] >= stages_sum - 0.05 and stages_sum > 0
    assert list(drafter_only["stages_s"]) == ["manual-v2"]
    a = load_file(out / "manual-v2" / "final" / "model.safetensors")
    b = load_file(out / "drafter-v2" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # --train-embeddings: the drafter's embeddings (its tied head) move; by default they do not
    init = load_file(out / "drafter" / "export-fp16" / "model.safetensors")
    assert torch.equal(a["embed_tokens.weight"], init["embed_tokens.weight"].float())
    unfrozen = subprocess.run([sys.executable, "-m", "deer_serve", "train", "--preset", "smoke",
                               "--out", str(out), "--stages", "drafter", "--drafter-name", "emb",
                               "--init-from", str(out / "drafter" / "export-fp16"),
                               "--stage0-steps", "0", "--stage1-steps", "0", "--stage2-steps", "2",
                               "--train-embeddings"], capture_output=True, text=True, timeout=budget.left())
    assert unfrozen.returncode == 0, unfrozen.stderr[-3000:]
    e = load_file(out / "emb" / "final" / "model.safetensors")
    assert not torch.equal(e["embed_tokens.weight"], a["embed_tokens.weight"])
    cfg = json.loads((out / "emb" / "final" / "metrics.json").read_text())["config"]
    assert cfg["freeze_embeddings"] is False

    # --arch dflash: the same recipe into the DFlash layout; export; vLLM-format checkpoint that
    # z-lab's loader reads; the pair decodes losslessly with it
    dfl = subprocess.run([sys.executable, "-m", "deer_serve", "train", "--preset", "smoke",
                          "--out", str(out), "--stages", "drafter", "--drafter-name", "dfl",
                          "--arch", "dflash"], capture_output=True, text=True, timeout=budget.left())
    assert dfl.returncode == 0, dfl.stderr[-3000:]
    dcfg = json.loads((out / "dfl" / "final" / "config.json").read_text())
    assert dcfg["architectures"] == ["DFlashDraftModel"] and "target_layer_ids" in dcfg["dflash_config"]
    recs = [json.loads(l) for l in (out / "dfl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in recs] == [0] * 3 + [1] * 6 + [2] * 6
    exp = subprocess.run([sys.executable, "-m", "deer_serve", "export", "--format", "dflash",
                          str(out / "dfl" / "final"), str(tmp_path / "dfl-export"),
                          "--target", str(tmp_path / "assets" / "target")],
                         capture_output=True, text=True, timeout=budget.left())
    assert exp.returncode == 0, exp.stderr
    refused = subprocess.run([sys.executable, "-m", "deer_serve", "export", "--format", "dflash",
                              str(tmp_path / "assets" / "drafter"), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=budget.left())
    assert refused.returncode == 2 and "DeerDrafter" in refused.stderr
    from deer_serve.drafters import load_drafter

    dd = load_drafter(tmp_path / "dfl-export", tmp_path / "assets" / "target", device="cpu")
    assert dd.format == "dflash"
    t2 = HFTarget.from_pretrained(str(tmp_path / "assets" / "target"), device="cpu",
                                  feature_layers=dd.feature_layers)
    assert generate(t2, dd, ids, sp, mode="deer", block_size=8).token_ids == ar.token_ids
    dflash_ref = pytest.importorskip("dflash.model")
    ref = dflash_ref.DFlashDraftModel.from_pretrained(str(tmp_path / "dfl-export"))
    assert ref.target_layer_ids == dcfg["dflash_config"]["target_layer_ids"]
