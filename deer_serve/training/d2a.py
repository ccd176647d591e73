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
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from deer_serve.models import DeerDrafter, DeerDrafterConfig
from deer_serve.targets.features import default_feature_layers, select_features
from deer_serve.training.target_fit import (head_and_embeddings, init_from_target,
                                            resolve_mask_token, target_dims)

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


def dflash_layer_ids(num_target_layers: int) -> list[int]:
    """Default target layers of a trained DFlash drafter: the two before the last. The last
    layer is avoided: Hugging Face returns it after the final norm, vLLM's runner before it."""
    L = num_target_layers
    return sorted({max(0, L - 3), max(0, L - 2)})


def dflash_from_target(target, cfg: "D2AConfig", mask_token_id: int):
    """A DFlash drafter with the target's embeddings and head, its layers initialised from the
    target's (`init_layers`, where names and shapes match), `fc` starting as "the last named
    layer's features". Sizes come from the target's config in its own words (`target_dims`)."""
    from deer_serve.models.dflash import DFlashConfig, DFlashDrafter

    emb, head, _ = head_and_embeddings(target)
    dims = target_dims(target.config, vocab_rows=head.shape[0])
    ids = list(cfg.feature_layers) if cfg.feature_layers else dflash_layer_ids(dims.num_layers)
    dcfg = DFlashConfig(
        vocab_size=dims.vocab_size, hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_kv_heads,
        head_dim=dims.head_dim, target_layer_ids=ids, mask_token_id=mask_token_id,
        block_size=max(cfg.block_sizes) + 1, num_target_layers=dims.num_layers,
        rms_norm_eps=dims.eps, rope_theta=dims.rope_theta,
        max_position_embeddings=dims.max_positions)
    torch.manual_seed(cfg.seed)
    d = DFlashDrafter(dcfg, emb.detach().float(), head.detach().float())
    with torch.no_grad():
        # (nn.Module.__setattr__ is typed for Tensor | Module values; a plain dict is stored as is)
        d.init_report = init_from_target(d, target, cfg.init_layers)  # type: ignore[assignment]
        w = torch.zeros_like(d.fc.weight)
        w[:, -dims.hidden_size:] = torch.eye(dims.hidden_size)
        d.fc.weight.copy_(w)
    return d


def load_for_training(cfg: "D2AConfig", path, target_dir):
    """A trained drafter to continue from (`init_from`), in cfg.arch's format."""
    if cfg.arch == "dflash":
        from deer_serve.models.dflash import load_dflash

        return load_dflash(path, target_dir, device="cpu", dtype=torch.float32).train()
    model = DeerDrafter.from_pretrained(path, dtype=torch.float32).train()
    if model.config.context_mode != cfg.context_mode:
        raise ValueError(f"{path} is a {model.config.context_mode} drafter")
    model.embed_tokens.weight.requires_grad_(not cfg.freeze_embeddings)
    return model


def drafter_from_target(target, cfg: D2AConfig, mask_token_id: int) -> DeerDrafter:
    """A drafter shaped like the target (hidden size, heads, vocabulary; `num_layers` Qwen3-style
    layers), initialised from it: embeddings = tied head (the target's LM head; the same table
    when the target ties them), and, where parameter names and shapes match, its final norm and
    `init_layers` decoder layers (Qwen3/Llama: all but Qwen3's q/k norms; GPT-2/NeoX: none).
    `.init_report` on the result says what was copied."""
    if cfg.arch == "dflash":
        return dflash_from_target(target, cfg, mask_token_id)
    emb, head, _ = head_and_embeddings(target)
    dims = target_dims(target.config, vocab_rows=head.shape[0])
    layers = cfg.feature_layers or default_feature_layers(dims.num_layers)
    dcfg = DeerDrafterConfig(
        vocab_size=dims.vocab_size, hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_kv_heads,
        head_dim=dims.head_dim, rms_norm_eps=dims.eps, rope_theta=dims.rope_theta,
        mask_token_id=mask_token_id, context_mode=cfg.context_mode,
        target_feature_layers=layers if cfg.context_mode == "target-features" else None,
        target_feature_dim=len(layers) * dims.hidden_size if cfg.context_mode == "target-features" else 0,
    )
    d = DeerDrafter(dcfg)
    with torch.no_grad():
        # an untied target's head, not its input table: with frozen embeddings the head is
        # what the drafter predicts through
        d.embed_tokens.weight.copy_(head)
        d.init_report = init_from_target(d, target, cfg.init_layers)
        if cfg.context_mode == "target-features":
            # start as "the last layer's (normed) features", the slice nearest the next token
            w = torch.zeros_like(d.feature_proj.weight)
            w[:, -dims.hidden_size:] = torch.eye(dims.hidden_size)
            d.feature_proj.weight.copy_(w)
    d.embed_tokens.weight.requires_grad_(not cfg.freeze_embeddings)
    return d


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def target_features(target, ids: torch.Tensor, layers: list, batch: int = 64) -> torch.Tensor:
    """(n, N) teacher ids -> (n, N, F) float16 features (on the CPU), by teacher forcing."""
    out = []
    dev = _device_of(target)
    for i in tqdm(range(0, len(ids), batch), desc="target features", unit="batch"):
        o = target(ids[i:i + batch].long().to(dev), output_hidden_states=True)
        out.append(select_features(o.hidden_states, layers).half().cpu())
    return torch.cat(out)


def make_blocks(ids: torch.Tensor, prompt_len: int, k: int, nb: int, mask_id: int,
                rng: np.random.Generator, stage: int, alpha: float = 1.01):
    """ids (B, N) -> block_ids (B, nb, k+1), anchor_pos (B, nb), labels (B, nb, k),
    weights (B, nb, k) and masked (B, nb, k) bool. Anchors lie where the next k tokens are the
    target's own continuation."""
    B, N = ids.shape
    lo, hi = prompt_len - 1, N - k - 1                                # anchor s in [lo, hi]
    nb = max(1, min(nb, hi - lo + 1))
    anchors = np.stack([np.sort(rng.choice(np.arange(lo, hi + 1), nb, replace=False)) for _ in range(B)])
    anchor_pos = torch.from_numpy(anchors)
    idx = anchor_pos[:, :, None] + torch.arange(k + 1)                # (B, nb, k+1)
    toks = torch.gather(ids.long(), 1, idx.view(B, -1)).view(B, nb, k + 1)
    labels = toks[:, :, 1:]
    if stage == 1:
        t = torch.from_numpy(rng.uniform(1e-3, 1.0, size=(B, nb, 1))).float()
        masked = torch.from_numpy(rng.uniform(size=(B, nb, k))).float() < t
        weights = masked.float() / t
    else:
        masked = torch.ones(B, nb, k, dtype=torch.bool)
        R = torch.from_numpy(rng.integers(1, k + 1, size=(B, nb, 1)))
        i = torch.arange(1, k + 1)
        weights = torch.where(i <= R, alpha ** (R - i).float(),
                              torch.zeros(()))
    block = toks.clone()
    block[:, :, 1:][masked] = mask_id
    return block, anchor_pos, labels, weights, masked


def block_loss(model, ids, feats, prompt_len, k, nb, mask_id, rng, stage, alpha=1.01):
    block, anchor_pos, labels, weights, _ = make_blocks(ids, prompt_len, k, nb, mask_id, rng,
                                                        stage, alpha)
    dev = _device_of(model)   # the blocks are drawn on the CPU (numpy), then moved
    logits = model(context_ids=ids.long().to(dev),
                   context_features=None if feats is None else feats.to(dev).float(),
                   block_ids=block.to(dev), anchor_pos=anchor_pos.to(dev))  # (B, nb, k, V)
    weights = weights.to(dev)
    ce = F.cross_entropy(logits.flatten(0, 2), labels.to(dev).flatten(), reduction="none").view_as(weights)
    if stage == 1:
        return (ce * weights).sum() / weights.numel()
    return (ce * weights).sum() / weights.sum()


@torch.no_grad()
def evaluate(model, val_ids, val_feats, prompt_len, mask_id, ks, n_blocks, seed=123) -> dict:
    """Whole-block-masked greedy accuracy by position and the mean number of leading correct
    positions (= tau a greedy cycle would get from this context), per k."""
    model.eval()
    dev = _device_of(model)
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


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def corpus_window_loss(model, target, corpus_ids: np.ndarray, n: int, cfg: "D2AConfig", k: int,
                       mask_id: int, rng: np.random.Generator):
    """Stage 0: Stage I's masked-diffusion loss on cfg.batch_size raw corpus windows of n
    tokens (blocks anywhere after the first token)."""
    starts = rng.integers(0, len(corpus_ids) - n, cfg.batch_size)
    win = torch.from_numpy(np.stack([corpus_ids[s:s + n] for s in starts]).astype(np.int64))
    feats = None
    if model.config.context_mode == "target-features":
        with torch.no_grad():
            hs = target(win.to(_device_of(target)), output_hidden_states=True).hidden_states
            feats = select_features(hs, model.config.target_feature_layers).half()
    nb = max(1, cfg.block_tokens // (k + 1))
    return block_loss(model, win, feats, 1, k, nb, mask_id, rng, 1)


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
