"""Corpus split, tokenizer round trip, and a smoke run of the target trainer (fast: < 60 s)."""

from __future__ import annotations

import json

import pytest

from deer_serve.training import corpus
from deer_serve.training.tokenizer import MASK, EOT, train_tokenizer


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(out, vocab_size=512, files=corpus.list_files("train")[:20], show_progress=False)
    return out


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def test_split_deterministic_and_disjoint():
    tr1, va1 = corpus.list_files("train"), corpus.list_files("validation")
    tr2, va2 = corpus.list_files("train"), corpus.list_files("validation")
    assert tr1 == tr2 and va1 == va2
    assert not set(tr1) & set(va1)
    assert set(tr1) | set(va1) == set(corpus.all_files())
    n = len(tr1) + len(va1)
    assert 450 <= n <= 700, n
    assert 0.005 <= len(va1) / n <= 0.06, (len(va1), n)
    root = corpus.stdlib_root()
    for p in tr1 + va1:
        rel = p.relative_to(root)
        assert p.suffix == ".py"
        assert not corpus.EXCLUDED_DIRS & set(rel.parts[:-1])
    assert tr1 == sorted(tr1, key=lambda p: p.relative_to(root).as_posix())
    assert len(corpus.read_texts("validation")) == len(va1)


def test_tokenizer_specials_and_round_trip(small_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_tokenizer))
    assert tok.convert_tokens_to_ids(EOT) == 0
    assert tok.convert_tokens_to_ids(MASK) == 1
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0 and tok.mask_token_id == 1
    assert len(tok) == 512
    # no special tokens added on encode, no prefix space
    assert tok("x = 1")["input_ids"] == tok.encode("x = 1", add_special_tokens=False)
    assert 0 not in tok("x = 1")["input_ids"]
    files = corpus.list_files("train")[100:104] + corpus.list_files("validation")[:2]
    tricky = " .  ,\n\tfoo  \r\n\u00e9\u4e2d\U0001f600 x ( ) ' \" "
    for text in [corpus.read_text(p) for p in files] + [tricky]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text


def test_tokenize_split_cached(small_tokenizer, tmp_path):
    arr = corpus.tokenize_split("validation", small_tokenizer, tmp_path, limit_files=3)
    assert arr.dtype.name == "int32" and (arr == 0).sum() == 3 and arr[-1] == 0
    again = corpus.tokenize_split("validation", small_tokenizer, tmp_path, limit_files=3)
    assert (arr == again).all()
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_smoke_target_run(small_tokenizer, data_cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deer_serve.training.train_target import TargetTrainConfig, train_target

    cfg = TargetTrainConfig.smoke()
    cfg.cache_dir = data_cache
    res = train_target(cfg, small_tokenizer, tmp_path / "target")
    assert res["val_loss"] < res["val_loss_init"] - 0.3
    log = [json.loads(line) for line in (tmp_path / "target" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == cfg.max_steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    final = tmp_path / "target" / "final"
    assert json.loads((final / "metrics.json").read_text())["val_loss"] == res["val_loss"]
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    assert model.config.eos_token_id == tok.eos_token_id == 0
    assert model.config.pad_token_id == 0 and model.config.num_hidden_layers == 2
    ids = tok("def f(x):\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 4


def test_smoke_resume_matches_uninterrupted(small_tokenizer, data_cache, tmp_path):
    import torch

    from deer_serve.training.train_target import TargetTrainConfig, train_target

    cfg = TargetTrainConfig.smoke()
    cfg.max_steps, cfg.ckpt_every, cfg.cache_dir = 8, 4, data_cache
    a = train_target(cfg, small_tokenizer, tmp_path / "a")
    cfg_half = TargetTrainConfig.smoke()
    cfg_half.max_steps, cfg_half.ckpt_every, cfg_half.stop_at_step = 8, 4, 3
    cfg_half.cache_dir = data_cache
    assert train_target(cfg_half, small_tokenizer, tmp_path / "b")["stopped_at"] == 3
    b = train_target(cfg, small_tokenizer, tmp_path / "b")  # resumes at step 4
    ca = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert cb["step"] == ca["step"] == 8
    for k, v in ca["model"].items():
        torch.testing.assert_close(cb["model"][k], v)
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
