"""D2A alignment: train a drafter on its target's own continuations (DESIGN.md section 3).

Two architectures, one recipe (`D2AConfig.arch`): "deer" (a DeerDrafter) and "dflash" (the
DFlash layout of `deer_serve.models.dflash`: the target's hidden states of `target_layer_ids`
as K/V in every layer, the target's embeddings and head; it saves in the DFlash format).

Every step trains many blocks of each teacher sequence in ONE forward (BD3-LM layout: the
sequence's causal context stream, then the blocks; block b sees the context before its anchor
and itself). A block is [anchor x_s, m_1..m_k] and learns x_{s+1..s+k}.

  Stage 0  (optional, ours): the same masked-diffusion loss on raw corpus windows instead of
           teacher text, blocks anywhere in the window (features by teacher-forcing the
           target on the window in target-features mode).
  Stage I  (AR-style distillation): each block position is masked with probability t ~ U(0,1],
           unmasked ones show the true token; loss = (1/t) * CE summed over masked positions.
  Stage II (refinement): the whole block is masked (the single-step regime of inference);
           position i of the first R positions (R ~ U(1,k)) weighs alpha^(R-i).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from deer_serve.models import DeerDrafter
from deer_serve.training.d2a_init import drafter_from_target, load_for_training
from deer_serve.training.d2a_losses import (block_loss, corpus_window_loss, device_of, lr_at,
                                            make_blocks, target_features)
from deer_serve.training.target_fit import resolve_mask_token

if TYPE_CHECKING:
    from deer_serve.models.dflash import DFlashDrafter


@dataclass
class D2AConfig:
    arch: str = "deer"                     # "deer" (DeerDrafter) | "dflash" (DFlash format)
    context_mode: str = "target-features"  # FINDINGS.md: tokens-only drafters stay near tau 1
    num_layers: int = 2                    # drafter depth; width/heads follow the target
    init_layers: str = "last"              # copy the target's "last" or "first" layers, or "none"
    freeze_embeddings: bool = True         # the tied head = the target's; the mask row stays as is
    feature_layers: Optional[list] = None  # target hidden_states indices; None = middle + last
                                           # (dflash: 0-based target layer ids; None = the two
                                           # layers before the last, `dflash_layer_ids`)
    block_sizes: tuple = (8, 16, 32)       # k is drawn from these each step
    block_tokens: int = 160                # blocks per sequence = block_tokens // (k+1)
    batch_size: int = 16                   # teacher sequences per step
    stage0_steps: int = 0                  # optional Stage 0 on raw corpus windows (0 = off)
    stage1_steps: int = 400
    stage2_steps: int = 1200
    lr0: float = 1e-3
    lr1: float = 1e-3
    lr2: float = 5e-4
    warmup_steps: int = 30
    alpha: float = 1.01                    # Stage II weight base (paper: 1.01 stable, 1.02 noisy)
    eval_every: int = 200
    eval_block_sizes: tuple = (4, 8, 16, 32)
    eval_blocks: int = 256                 # validation blocks per k
    ckpt_every: int = 100
    num_threads: int = 2
    seed: int = 0
    init_from: Optional[str] = None        # continue from a trained drafter dir (Stage I/II weights)
    device: str = "cpu"                    # where the drafter trains and the target runs
    use_docstring_data: bool = True        # train on the teacher's docstring-prompt set too
    docstring_rows: Optional[int] = None   # only its first N rows (None = all of them)

    @classmethod
    def smoke(cls, **kw) -> "D2AConfig":
        base: dict[str, Any] = dict(block_sizes=(4, 8), eval_block_sizes=(4, 8), block_tokens=40,
                                    batch_size=4, stage0_steps=3, stage1_steps=6,
                                    stage2_steps=6, eval_every=6, eval_blocks=16, ckpt_every=4)
        base.update(kw)
        return cls(**base)


@torch.no_grad()
def evaluate(model, val_ids, val_feats, prompt_len, mask_id, ks, n_blocks, seed=123) -> dict:
    """Whole-block-masked greedy accuracy by position and the mean number of leading correct
    positions (= tau a greedy cycle would get from this context), per k."""
    model.eval()
    dev = device_of(model)
    out = {}
    for k in ks:
        rng = np.random.default_rng(seed)
        nb = max(1, n_blocks // len(val_ids))
        block, anchor_pos, labels, _, _ = make_blocks(val_ids, prompt_len, k, nb, mask_id, rng, 2)
        hits = []
        for i in range(0, len(val_ids), 32):
            lg = model(context_ids=val_ids[i:i + 32].long().to(dev),
                       context_features=None if val_feats is None else val_feats[i:i + 32].to(dev).float(),
                       block_ids=block[i:i + 32].to(dev), anchor_pos=anchor_pos[i:i + 32].to(dev))
            hits.append((lg.argmax(-1).cpu() == labels[i:i + 32]).flatten(0, 1))
        hit = torch.cat(hits).float()                                  # (blocks, k)
        out[str(k)] = {"acc_by_pos": [round(a, 4) for a in hit.mean(0).tolist()],
                       "tau": round(hit.cumprod(1).sum(1).mean().item(), 3)}
    model.train()
    return out



def load_target(target_dir, device: str = "cpu"):
    """The target for teacher forcing: float32 on a CPU (as the torch backend serves it there),
    bfloat16 on a GPU."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).to(device).eval()


@dataclass
class D2ARun:
    """A prepared D2A run (what `train_drafter` trains): the drafter, the teacher data and the
    target features. ids (n, P+G) int32 with docstring rows appended; feats (n, P+G, F) float16
    or None (tokens mode); target: kept for Stage 0 only."""
    cfg: D2AConfig
    model: Union[DeerDrafter, DFlashDrafter]
    tok: Any                           # a transformers tokenizer
    mask_id: int
    ids: torch.Tensor
    val_ids: torch.Tensor
    P: int
    feats: Optional[torch.Tensor] = None
    val_feats: Optional[torch.Tensor] = None
    val_doc: Optional[torch.Tensor] = None
    val_doc_feats: Optional[torch.Tensor] = None
    target: Optional[torch.nn.Module] = None
    corpus_ids: Optional[np.ndarray] = None

    def evaluate(self) -> dict:
        c = self.cfg
        r = evaluate(self.model, self.val_ids, self.val_feats, self.P, self.mask_id,
                     c.eval_block_sizes, c.eval_blocks)
        if self.val_doc is not None:
            r["docstring"] = evaluate(self.model, self.val_doc, self.val_doc_feats, self.P,
                                      self.mask_id, c.eval_block_sizes, c.eval_blocks)
        return r

    def loss(self, step: int):
        """The loss of training step `step` (0-based): (loss, stage, k). Batches are
        f(seed, step), so a resumed run draws what an uninterrupted one would."""
        cfg = self.cfg
        s0n, s1n = cfg.stage0_steps, cfg.stage1_steps
        stage = 0 if step < s0n else 1 if step < s0n + s1n else 2
        rng = np.random.default_rng([cfg.seed, step])
        if stage == 0:
            k = int(rng.choice(cfg.block_sizes))
            assert self.corpus_ids is not None  # prepare_run refuses Stage 0 without them
            return corpus_window_loss(self.model, self.target, self.corpus_ids, self.ids.shape[1],
                                      cfg, k, self.mask_id, rng), stage, k
        rows = torch.from_numpy(rng.integers(0, len(self.ids), cfg.batch_size))
        k = int(rng.choice(cfg.block_sizes))
        nb = max(1, cfg.block_tokens // (k + 1))
        loss = block_loss(self.model, self.ids[rows], None if self.feats is None else self.feats[rows],
                          self.P, k, nb, self.mask_id, rng, stage, cfg.alpha)
        return loss, stage, k


def prepare_run(cfg: D2AConfig, target_dir: str | Path, teacher_path: str | Path,
                corpus_ids: Optional[np.ndarray] = None,
                feature_cache: Optional[dict] = None) -> D2ARun:
    """Load the target and the teacher data, build (or load, `init_from`) the drafter, compute
    the target features (target-features mode; once per teacher set with `feature_cache`).
    The mask token: the tokenizer's own, else `<|mask|>`, else an unused embedding row
    (`resolve_mask_token`; the tokenizer then names it)."""
    from deer_serve.training.target_fit import load_tokenizer

    torch.set_num_threads(cfg.num_threads)
    if cfg.arch not in ("deer", "dflash"):
        raise ValueError(f"arch must be deer or dflash, got {cfg.arch!r}")
    if cfg.arch == "dflash" and cfg.context_mode != "target-features":
        raise ValueError("a DFlash drafter reads target features (context_mode target-features)")
    tok = load_tokenizer(target_dir)
    target = load_target(target_dir, cfg.device)
    mask_id = resolve_mask_token(tok, target.get_input_embeddings().weight.shape[0])
    teacher = torch.load(teacher_path)
    ids, val_ids, P = teacher["ids"], teacher["val_ids"], teacher["prompt_len"]
    with_doc = cfg.use_docstring_data and "doc_ids" in teacher
    n_doc = 0
    if with_doc:
        doc = teacher["doc_ids"][:cfg.docstring_rows] if cfg.docstring_rows else teacher["doc_ids"]
        if cfg.docstring_rows and len(doc) < cfg.docstring_rows:
            raise ValueError(f"docstring_rows={cfg.docstring_rows} but {teacher_path} has "
                             f"{len(doc)} docstring continuations")
        n_doc = len(doc)
        ids = torch.cat([ids, doc])
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = load_for_training(cfg, cfg.init_from, target_dir)
    else:
        model = drafter_from_target(target, cfg, mask_id).train()
    model.to(cfg.device)
    run = D2ARun(cfg, model, tok, mask_id, ids, val_ids, P, val_doc=teacher.get("val_doc_ids"),
                 corpus_ids=corpus_ids)
    if cfg.context_mode == "target-features":
        layers = model.config.target_feature_layers
        cache = {} if feature_cache is None else feature_cache

        def features(name: str, x: torch.Tensor) -> torch.Tensor:
            key = (str(teacher_path), name, tuple(layers))
            if key not in cache:
                cache[key] = target_features(target, x, layers)
            return cache[key]
        run.feats = features(f"train+docstring:{n_doc}" if with_doc else "train", ids)
        run.val_feats = features("val", val_ids)
        if run.val_doc is not None:
            run.val_doc_feats = features("val_doc", run.val_doc)
    if cfg.stage0_steps:
        if corpus_ids is None or len(corpus_ids) <= ids.shape[1]:
            raise ValueError("Stage 0 needs the tokenized corpus (corpus_ids)")
        run.target = target
    return run


def measure_step_seconds(cfg: D2AConfig, target_dir: str | Path, teacher_path: str | Path,
                         n_steps: int = 3, feature_cache: Optional[dict] = None) -> dict:
    """Time a few D2A steps (after one warm-up step) and one evaluation on a throwaway drafter:
    {"setup_s", "step_s" (the mean; Stage I and II steps cost the same), "eval_s", "save_s"}.
    Share `feature_cache` with the real run so the target features are computed once."""
    import tempfile

    t0 = time.perf_counter()
    run = prepare_run(cfg, target_dir, teacher_path, feature_cache=feature_cache)
    setup = time.perf_counter() - t0
    params = [p for p in run.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr1, betas=(0.9, 0.95), weight_decay=0.01)
    times = []
    for step in range(n_steps + 1):
        t = time.perf_counter()
        loss, _, _ = run.loss(cfg.stage0_steps + step)  # Stage I steps (Stage II costs the same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss.item()                                      # (a host sync on a GPU)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    run.evaluate()
    eval_s = time.perf_counter() - t
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": run.model.state_dict(), "opt": opt.state_dict()}, Path(d) / "ckpt.pt")
    save_s = time.perf_counter() - t
    return {"setup_s": round(setup, 3), "step_s": round(sum(times[1:]) / n_steps, 4),
            "first_step_s": round(times[0], 4), "eval_s": round(eval_s, 3), "save_s": round(save_s, 3)}


def train_drafter(cfg: D2AConfig, target_dir: str | Path, teacher_path: str | Path,
                  out_dir: str | Path, corpus_ids: Optional[np.ndarray] = None,
                  feature_cache: Optional[dict] = None) -> dict:
    """Stage 0 (optional, on `corpus_ids`: the tokenized train split), Stage I, Stage II;
    resumable from out_dir/ckpt.pt; final weights in out_dir/final. feature_cache: a dict
    shared by runs on the same target and teacher data (the preset's continuation phases): the
    target features of each teacher set are computed once (a few minutes on a CPU)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = prepare_run(cfg, target_dir, teacher_path, corpus_ids, feature_cache)
    model = run.model
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    s0n, s1n = cfg.stage0_steps, cfg.stage1_steps
    total = s0n + s1n + cfg.stage2_steps
    opt = torch.optim.AdamW(params, lr=cfg.lr1, betas=(0.9, 0.95), weight_decay=0.01)
    step, elapsed = 0, 0.0
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=False, map_location=cfg.device)
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        step, elapsed = s["step"], s["elapsed"]
    log_path = out / "metrics.jsonl"
    if log_path.exists():  # an interrupted run logged steps past its checkpoint: they rerun
        kept = [ln for ln in log_path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    log = log_path.open("a")
    bar = tqdm(total=total, initial=step, desc=f"d2a {cfg.arch} {cfg.context_mode}", unit="step")
    t0 = time.time() - elapsed
    result = {}
    last_val = None                                                    # the eval at step == total
    while step < total:
        stage = 0 if step < s0n else 1 if step < s0n + s1n else 2
        first = (0, s0n, s0n + s1n)[stage]                               # the stage's first step
        n_stage = (s0n, s1n, cfg.stage2_steps)[stage]
        lr = lr_at(step - first, n_stage, (cfg.lr0, cfg.lr1, cfg.lr2)[stage], cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, stage, k = run.loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(stage=stage, k=k, loss=f"{loss.item():.3f}")
        rec = {"step": step, "stage": stage, "k": k, "loss": round(loss.item(), 4), "lr": lr,
               "elapsed_s": round(time.time() - t0, 1)}
        if step % cfg.eval_every == 0 or step == total or step in (s0n, s0n + s1n):
            rec["val"] = run.evaluate()
            bar.write(f"step {step} stage {stage}: " +
                      ", ".join(f"k={k}: tau~{v['tau']}" for k, v in rec["val"].items() if k != "docstring")
                      + ("; docstring prompts: " + ", ".join(
                          f"k={k}: tau~{v['tau']}" for k, v in rec["val"]["docstring"].items())
                         if "docstring" in rec["val"] else ""))
            if step == s0n and s0n:
                result["after_stage0"] = rec["val"]
            if step == s0n + s1n and s1n:  # the "Stage I only" row of the ablation
                result["after_stage1"] = rec["val"]
                model.save_pretrained(out / "stage1", safe_serialization=True)
            if step == total:
                last_val = rec["val"]
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step % cfg.ckpt_every == 0 or step == total:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "elapsed": time.time() - t0, "config": asdict(cfg)}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    bar.close()
    # the evaluation at the last step, when this call ran it (the model has not moved since)
    final = last_val if last_val is not None else run.evaluate()
    result.update({"final": final, "trainable_params": n_params, "steps": total,
                   "train_seconds": round(time.time() - t0, 1), "config": asdict(cfg)})
    if getattr(model, "init_report", None):
        result["init"] = model.init_report
    result["mask_token_id"] = run.mask_id
    model.eval().save_pretrained(out / "final", safe_serialization=True)
    if cfg.arch == "deer":  # a DFlash drafter uses its target's tokenizer (the format has none)
        run.tok.save_pretrained(out / "final")
    (out / "final" / "metrics.json").write_text(json.dumps(result, indent=1))
    return result
