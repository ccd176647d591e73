"""`deer-serve train drafter`: bad input gives a message and exit code 2 (never a traceback);
the pieces it is made of (mask token, sizes from any config, layer copying, resumable teacher
data from prompts, the budget plan) on tiny targets of other architectures."""

from __future__ import annotations

import json

import pytest
import torch

from any_targets import make_full, make_gpt2, make_llama, make_neox, write_prompts

from deer_serve.cli import run as cli_run


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("any")
    return {"llama": make_llama(root / "llama"), "gpt2": make_gpt2(root / "gpt2"),
            "neox": make_neox(root / "neox"), "full": make_full(root / "full"),
            "prompts": write_prompts(root / "prompts.jsonl")}


TINY = ["--prompt-len", "12", "--gen-len", "16", "--block-size", "8", "--batch-size", "2",
        "--block-tokens", "18", "--eval-blocks", "8", "--teacher-batch-size", "8", "--threads", "1"]


def train(capsys, *args) -> tuple[int, str]:
    rc = cli_run(["train", "drafter", *args])
    err = capsys.readouterr().err
    return rc, err


def refused(capsys, *args) -> str:
    rc, err = train(capsys, *args)
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_drafter_dir_is_not_a_target(capsys, tmp_path, targets, tiny_checkpoints):
    for d in ("drafter-target-features", "drafter-dflash"):
        msg = refused(capsys, "--target", str(tiny_checkpoints[d]), "--prompts",
                      str(targets["prompts"]), "--out", str(tmp_path / "o"))
        assert "is a drafter, not a causal LM" in msg


def test_a_dir_without_config_or_not_a_causal_lm(capsys, tmp_path, targets):
    p = str(targets["prompts"])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in refused(capsys, "--target", str(tmp_path / "empty"), "--prompts", p,
                                       "--out", str(tmp_path / "o"))
    assert "no such directory" in refused(capsys, "--target", str(tmp_path / "nope"), "--prompts", p,
                                          "--out", str(tmp_path / "o"))
    enc = tmp_path / "encoder"           # a config transformers knows, but no causal LM
    enc.mkdir()
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(enc)
    assert "not a causal LM" in refused(capsys, "--target", str(enc), "--prompts", p,
                                        "--out", str(tmp_path / "o"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    assert "not valid JSON" in refused(capsys, "--target", str(tmp_path / "junk"), "--prompts", p,
                                       "--out", str(tmp_path / "o"))


def test_empty_or_malformed_prompts(capsys, tmp_path, targets):
    t = str(targets["gpt2"])
    cases = {"": "no prompts", "\n\n": "no prompts", '{"prompt": "a"}\nnot json\n': ":2: not JSON",
             '{"text": "a"}\n': ':1: expected {"prompt": "..."}', '["a"]\n': "expected",
             '{"prompt": "   "}\n': "empty prompt", '{"prompt": "def f():"}\n': "at least 2"}
    for i, (text, want) in enumerate(cases.items()):
        f = tmp_path / f"p{i}.jsonl"
        f.write_text(text)
        assert want in refused(capsys, "--target", t, "--prompts", str(f), "--out", str(tmp_path / "o"))
    assert "cannot read --prompts" in refused(capsys, "--target", t, "--prompts",
                                              str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))


def test_a_tokenizer_that_cannot_take_a_mask_token(capsys, tmp_path, targets):
    msg = refused(capsys, "--target", str(targets["full"]), "--prompts", str(targets["prompts"]),
                  "--out", str(tmp_path / "o"))
    assert "this tokenizer cannot take a mask token" in msg


def test_flag_mistakes(capsys, tmp_path, targets):
    base = ["--target", str(targets["gpt2"]), "--prompts", str(targets["prompts"]), "--out",
            str(tmp_path / "o")]
    assert "not both" in refused(capsys, *base, "--minutes", "1", "--stage2-steps", "3")
    assert "--minutes must be > 0" in refused(capsys, *base, "--minutes", "0")
    assert "--gen-len" in refused(capsys, *base, "--gen-len", "4", "--block-size", "8")
    assert "--block-size" in refused(capsys, *base, "--block-size", "0")
    assert refused(capsys, *base, "--arch", "dflash", "--context-mode", "tokens")
    if not torch.cuda.is_available():
        assert "no CUDA device" in refused(capsys, *base, "--device", "cuda")


def test_a_budget_too_small_for_one_step(capsys, tmp_path, targets):
    out = tmp_path / "o"
    msg = refused(capsys, "--target", str(targets["gpt2"]), "--prompts", str(targets["prompts"]),
                  "--out", str(out), "--minutes", "0.0005", *TINY)
    assert "the budget is too small for one step" in msg and "give --minutes" in msg
    assert (out / "teacher.pt").is_file()  # the teacher data stays for the next try
    assert not (out / "final").exists()


def test_a_checkpoint_of_another_run_is_not_resumed(capsys, tmp_path, targets):
    out = tmp_path / "o"
    args = ["--target", str(targets["gpt2"]), "--prompts", str(targets["prompts"]), "--out", str(out),
            *TINY]
    rc, err = train(capsys, *args, "--stage1-steps", "1", "--stage2-steps", "1")
    assert rc == 0, err[-3000:]
    assert "checkpoint of another run" in refused(capsys, *args, "--stage1-steps", "1",
                                                  "--stage2-steps", "1", "--lr2", "1e-3")
    # the same flags again: resumes (finished: nothing to train) and keeps the result
    rc, err = train(capsys, *args, "--stage1-steps", "1", "--stage2-steps", "1")
    assert rc == 0, err[-3000:]
    recs = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in recs] == [1, 2]


# ---- the pieces --------------------------------------------------------------------------

def test_mask_token_own_vocab_spare_or_refused(targets):
    from deer_serve.training.target_fit import TargetError, load_tokenizer, resolve_mask_token

    llama = load_tokenizer(targets["llama"])
    assert resolve_mask_token(llama, 300) == llama.convert_tokens_to_ids("[MASK]") == 1
    gpt2 = load_tokenizer(targets["gpt2"])
    n = len(gpt2)
    assert gpt2.mask_token is None
    assert resolve_mask_token(gpt2, n + 8) == n          # the first row the tokenizer does not use
    assert gpt2.mask_token == "<|mask|>" and gpt2.convert_tokens_to_ids("<|mask|>") == n
    assert resolve_mask_token(gpt2, n + 8) == n          # the second time it is the tokenizer's own
    with pytest.raises(TargetError, match="cannot take a mask token"):
        resolve_mask_token(load_tokenizer(targets["gpt2"]), n)
    with pytest.raises(TargetError, match="outside the target"):
        resolve_mask_token(load_tokenizer(targets["llama"]), 1)


def test_sizes_and_layers_from_any_config(targets):
    from transformers import AutoModelForCausalLM

    from deer_serve.training.d2a import D2AConfig
    from deer_serve.training.d2a_init import drafter_from_target
    from deer_serve.training.target_fit import target_dims

    # tensors copied per layer: Llama all but Qwen3's q/k norms; GPT-2 none (other names);
    # NeoX only its two layer-norm gains (its input_/post_attention_layernorm share the names)
    want = {"llama": (128, 2, 9), "gpt2": (256, 4, 0), "neox": (128, 4, 2)}
    for name, (ffn, kv, per_layer) in want.items():
        model = AutoModelForCausalLM.from_pretrained(str(targets[name]))
        dims = target_dims(model.config, model.get_output_embeddings().weight.shape[0])
        assert (dims.hidden_size, dims.num_layers, dims.num_heads, dims.head_dim) == (64, 3, 4, 16)
        assert (dims.intermediate_size, dims.num_kv_heads) == (ffn, kv)
        for arch in ("deer", "dflash"):
            d = drafter_from_target(model, D2AConfig(arch=arch), mask_token_id=1)
            rep = d.init_report
            assert rep["layer_tensors_copied"] == 2 * per_layer, (name, arch, rep)
            assert rep["source_layers"] == [1, 2] and rep["final_norm_copied"] == (name == "llama")
            head = model.get_output_embeddings().weight
            got = d.embed_tokens.weight if arch == "deer" else d.head_weight
            assert torch.equal(got, head)                # the target's head, tied or not
        if name == "llama":                                # q/k/v/o and the MLP: the target's
            src = model.model.layers[2].self_attn.q_proj.weight
            assert torch.equal(d.layers[1].self_attn.q_proj.weight, src)


def test_teacher_from_prompts_is_resumable(tmp_path, targets):
    from deer_serve.training.target_fit import load_tokenizer
    from deer_serve.training.teacher import (PromptTeacherConfig, split_prompts,
                                             teacher_from_prompts, tokenize_prompts)

    tok = load_tokenizer(targets["llama"])
    from any_targets import PROMPT_TEXTS

    cfg = PromptTeacherConfig(prompt_len=16, gen_len=8, batch_size=4, num_threads=1, val_fraction=0.2)
    ids = tokenize_prompts(tok, PROMPT_TEXTS, cfg.prompt_len)
    assert max(map(len, ids)) == 16 and min(map(len, ids)) < 16    # truncated and short ones
    train, sampled, val = split_prompts(len(ids), cfg)
    assert sorted(train + val) == list(range(len(ids))) and set(sampled) <= set(train)
    out = tmp_path / "teacher.pt"
    a = teacher_from_prompts(targets["llama"], ids, out, cfg)
    assert a["ids"].shape == (len(train) + len(sampled), 24) and a["val_ids"].shape == (len(val), 24)
    assert a["prompt_len"] == 16 and int(a["sampled"].sum()) == len(sampled) > 0
    for row, i in zip(a["ids"], a["prompt_index"]):              # each row starts with its prompt
        p = ids[int(i)]
        assert row[:len(p)].tolist() == p
    parts = sorted((tmp_path / "teacher-parts").iterdir())
    assert parts
    # an interrupted run: the file and one batch lost; the rerun makes that batch only
    out.unlink()
    lost = parts[len(parts) // 2]
    lost.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in parts if p != lost}
    b = teacher_from_prompts(targets["llama"], ids, out, cfg)
    assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["val_ids"], b["val_ids"])
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()) and lost.exists()
    # another setting makes other parts (the old ones are not taken for them)
    c = teacher_from_prompts(targets["llama"], ids, out, PromptTeacherConfig(
        prompt_len=16, gen_len=8, batch_size=4, num_threads=1, val_fraction=0.2, temperature=1.3))
    assert c["fingerprint"] != b["fingerprint"] and torch.equal(c["val_ids"], b["val_ids"])


def test_budget_plan():
    from deer_serve.training.drafter_cli import UsageError, plan_steps

    m = {"setup_s": 2.0, "step_s": 0.5, "eval_s": 3.0, "save_s": 0.2}
    p = plan_steps(600.0, m, ckpt_every=100)
    total = p["stage1_steps"] + p["stage2_steps"]
    assert p["stage1_steps"] == round(0.25 * total)
    cost = (m["setup_s"] + total * (m["step_s"] + m["save_s"] / 100) + p["planned_evals"] * m["eval_s"]
            + 2 * m["save_s"])
    assert cost <= 600 and cost > 0.8 * 600
    assert p["eval_every"] == -(-total // 4)
    small = plan_steps(2.0 + 0.4 + 6.0 + 3.0, m, ckpt_every=100)         # a few steps, 2 evaluations
    assert small["planned_evals"] == 2 and small["stage1_steps"] + small["stage2_steps"] >= 1
    with pytest.raises(UsageError, match="too small for one step"):
        plan_steps(5.0, m, ckpt_every=100)
