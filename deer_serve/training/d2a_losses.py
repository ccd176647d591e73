"""The D2A training blocks and losses (deer_serve.training.d2a): BD3-LM blocks drawn from
teacher sequences, the Stage I / II block loss, Stage 0's loss on raw corpus windows, the target
features by teacher forcing, and the learning-rate schedule of each stage."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from deer_serve.targets.features import select_features

if TYPE_CHECKING:
    from deer_serve.training.d2a import D2AConfig


def device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def target_features(target, ids: torch.Tensor, layers: list, batch: int = 64) -> torch.Tensor:
    """(n, N) teacher ids -> (n, N, F) float16 features (on the CPU), by teacher forcing."""
    out = []
    dev = device_of(target)
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
    dev = device_of(model)   # the blocks are drawn on the CPU (numpy), then moved
    logits = model(context_ids=ids.long().to(dev),
                   context_features=None if feats is None else feats.to(dev).float(),
                   block_ids=block.to(dev), anchor_pos=anchor_pos.to(dev))  # (B, nb, k, V)
    weights = weights.to(dev)
    ce = F.cross_entropy(logits.flatten(0, 2), labels.to(dev).flatten(), reduction="none").view_as(weights)
    if stage == 1:
        return (ce * weights).sum() / weights.numel()
    return (ce * weights).sum() / weights.sum()


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
            hs = target(win.to(device_of(target)), output_hidden_states=True).hidden_states
            feats = select_features(hs, model.config.target_feature_layers).half()
    nb = max(1, cfg.block_tokens // (k + 1))
    return block_loss(model, win, feats, 1, k, nb, mask_id, rng, 1)
