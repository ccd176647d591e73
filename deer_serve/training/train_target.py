"""Train the embedded default target: a small `Qwen3ForCausalLM`, from scratch, on the stdlib corpus.

    python -m deer_serve.training.tokenizer --out runs/tiny-code/tokenizer
    python -m deer_serve.training.train_target --tokenizer runs/tiny-code/tokenizer \
        --out runs/tiny-code/target [--max-steps N] [--smoke]

Writes into `out`:
  metrics.jsonl   one JSON line per step (step, loss, lr, elapsed) and per validation (val_loss)
  ckpt.pt         resumable checkpoint (model, optimizer, step, RNG), every `ckpt_every` steps;
                  a run started on a dir with ckpt.pt resumes from it
  data_cache/     the tokenized corpus (.npy)
  final/          the model (`save_pretrained`, safetensors) + tokenizer files + metrics.json,
                  loadable with AutoModelForCausalLM / AutoTokenizer from that one dir

No Ray / pydantic imports here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from deer_serve.training import corpus

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TargetTrainConfig:
    # --- model (Qwen3 architecture) ---
    num_layers: int = 4  # transformer blocks
    hidden_size: int = 256  # residual width
    intermediate_size: int = 768  # SwiGLU FFN width
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA)
    head_dim: int = 64  # per-head width
    tie_embeddings: bool = True  # LM head shares the input embedding
    max_position_embeddings: int = 2048  # longest context the model is configured for
    rope_theta: float = 10000.0  # rotary base
    # --- data ---
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 16  # sequences per step (16 x 256 = 4096 tokens a step)
    train_limit_files: int | None = None  # only the first N train files (smoke runs / tests)
    cache_dir: str | None = None  # tokenized-corpus cache (default: out_dir/data_cache)
    # --- optimisation ---
    lr: float = 1e-3  # AdamW peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # on matrices only (not norms)
    warmup_steps: int = 50  # linear warm-up from 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * this at max_steps
    grad_clip: float = 1.0  # global grad-norm clip
    max_steps: int = 850  # about 24 min on 2 CPU cores (about 1.7 s a step)
    # --- bookkeeping ---
    val_every: int = 200  # validation loss every N steps (and at the start and the end)
    val_batches: int = 16  # fixed validation set: up to this many batches of batch_size sequences
    ckpt_every: int = 100  # resumable checkpoint every N steps
    log_every: int = 1  # metrics.jsonl line every N steps
    num_threads: int = 2  # torch.set_num_threads
    seed: int = 0
    stop_at_step: int | None = None  # checkpoint and return early at this step (a planned interruption)

    @classmethod
    def smoke(cls) -> "TargetTrainConfig":
        """A tiny model and 20 short steps: finishes in seconds."""
        return cls(
            num_layers=2,
            hidden_size=64,
            intermediate_size=192,
            num_heads=2,
            num_kv_heads=1,
            head_dim=32,
            seq_len=64,
            batch_size=8,
            train_limit_files=40,
            lr=3e-3,
            warmup_steps=5,
            max_steps=20,
            val_every=10,
            val_batches=2,
            ckpt_every=10,
            num_threads=1,
        )


def build_model_config(cfg: TargetTrainConfig, vocab_size: int, eot_id: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        use_sliding_window=False,
        max_window_layers=cfg.num_layers,
        attention_dropout=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )


def lr_at(step: int, cfg: TargetTrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * ratio


def train_batch(data: np.ndarray, step: int, cfg: TargetTrainConfig):
    """The batch for `step`: random windows of seq_len+1 tokens, a pure function of (seed, step),
    so a resumed run sees exactly the batches an uninterrupted one would."""
    import torch

    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(data) - cfg.seq_len - 1, size=cfg.batch_size)
    x = np.stack([data[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x)


def val_batches(data: np.ndarray, cfg: TargetTrainConfig):
    """The fixed validation set: consecutive non-overlapping windows of seq_len+1 tokens."""
    import torch

    n = min((len(data) - 1) // cfg.seq_len, cfg.val_batches * cfg.batch_size)
    if n <= 0:
        raise ValueError("validation split too small for one sequence")
    rows = np.stack([data[i * cfg.seq_len : i * cfg.seq_len + cfg.seq_len + 1] for i in range(n)])
    t = torch.from_numpy(rows.astype(np.int64))
    return [t[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]


def lm_loss(model, x):
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


def evaluate(model, batches) -> float:
    import torch

    was_training = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            tot += lm_loss(model, b).item() * b.numel()
            n += b.numel()
    model.train(was_training)
    return tot / n


def _rng_state():
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s):
    import torch

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def copy_tokenizer_files(tokenizer_dir: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
            shutil.copy2(src, dst / name)


def train_target(cfg: TargetTrainConfig, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """Train (or resume) the target; returns the final metrics dict (also in out_dir/final/metrics.json)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eot_id = tok.convert_tokens_to_ids(corpus.EOT)
    t0 = time.time()
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "data_cache"
    train = corpus.tokenize_split("train", tokenizer_dir, cache_dir, limit_files=cfg.train_limit_files)
    val = corpus.tokenize_split("validation", tokenizer_dir, cache_dir)
    print(f"data: {len(train):,} train tokens, {len(val):,} validation tokens ({time.time() - t0:.1f}s)", flush=True)
    vbatches = val_batches(val, cfg)

    model = Qwen3ForCausalLM(build_model_config(cfg, len(tok), eot_id))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=False,
    )

    metrics_path = out_dir / "metrics.jsonl"
    ckpt_path = out_dir / "ckpt.pt"
    step, elapsed_before = 0, 0.0
    val_init = None
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, elapsed_before, val_init = ck["step"], ck.get("elapsed", 0.0), ck.get("val_loss_init")
        _set_rng_state(ck["rng"])
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
        _append_jsonl(metrics_path, {"event": "resume", "step": step})
    else:
        if metrics_path.exists():
            metrics_path.unlink()
        _append_jsonl(
            metrics_path,
            {"event": "start", "params": n_params, "train_tokens": int(len(train)), "val_tokens": int(len(val)),
             "config": dataclasses.asdict(cfg)},
        )
        val_init = evaluate(model, vbatches)
        _append_jsonl(metrics_path, {"step": 0, "val_loss": val_init, "elapsed": 0.0})
    print(f"model: {n_params:,} parameters; steps {step}..{cfg.max_steps}", flush=True)

    def save_ckpt(step_done: int, elapsed: float) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step_done, "elapsed": elapsed,
             "rng": _rng_state(), "config": dataclasses.asdict(cfg), "val_loss_init": val_init},
            tmp,
        )
        os.replace(tmp, ckpt_path)

    t_start = time.time()
    val_loss = None
    pbar = tqdm(total=cfg.max_steps, initial=step, desc="target", dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        x = train_batch(train, step, cfg)
        loss = lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        elapsed = elapsed_before + time.time() - t_start
        lv = loss.item()
        if step % cfg.log_every == 0:
            _append_jsonl(metrics_path, {"step": step, "loss": lv, "lr": lr, "grad_norm": float(gnorm),
                                         "elapsed": round(elapsed, 3)})
        pbar.update(1)
        pbar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.2e}", s_per_step=f"{elapsed / max(1, step):.2f}")
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            val_loss = evaluate(model, vbatches)
            _append_jsonl(metrics_path, {"step": step, "val_loss": val_loss, "elapsed": round(elapsed, 3)})
            pbar.write(f"step {step}: val_loss {val_loss:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save_ckpt(step, elapsed)
        if cfg.stop_at_step is not None and step >= cfg.stop_at_step and step < cfg.max_steps:
            save_ckpt(step, elapsed)
            pbar.close()
            print(f"stopped at step {step} (stop_at_step); rerun to resume", flush=True)
            return {"stopped_at": step, "val_loss_init": val_init}
    pbar.close()
    elapsed = elapsed_before + time.time() - t_start
    if val_loss is None:  # resumed on an already-finished checkpoint
        val_loss = evaluate(model, vbatches)

    final = out_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    model.config.eos_token_id = eot_id
    model.config.bos_token_id = eot_id
    model.config.pad_token_id = eot_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = eot_id
        model.generation_config.bos_token_id = eot_id
        model.generation_config.pad_token_id = eot_id
    model.save_pretrained(str(final), safe_serialization=True)
    copy_tokenizer_files(tokenizer_dir, final)
    result = {
        "val_loss": val_loss,
        "val_loss_init": val_init,
        "steps": step,
        "elapsed_s": round(elapsed, 1),
        "s_per_step": round(elapsed / max(1, step), 3),
        "params": n_params,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "val_eval_tokens": int(sum(b[:, 1:].numel() for b in vbatches)),
        "eos_token_id": eot_id,
        "mask_token_id": tok.convert_tokens_to_ids("<|mask|>"),
        "config": dataclasses.asdict(cfg),
    }
    (final / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"done: val_loss {val_loss:.4f} after {step} steps, {elapsed:.0f}s; saved to {final}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the small Qwen3 target on the stdlib corpus.")
    ap.add_argument("--out", required=True, help="output directory (resumes from its ckpt.pt)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory (from deer_serve.training.tokenizer)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 20 steps, seq len 64")
    args = ap.parse_args(argv)
    cfg = TargetTrainConfig.smoke() if args.smoke else TargetTrainConfig()
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if args.seed is not None:
        cfg.seed = args.seed
    train_target(cfg, args.tokenizer, args.out)


if __name__ == "__main__":
    main()
