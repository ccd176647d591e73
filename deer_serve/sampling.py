"""Logit processing and token sampling, shared by the target (p) and the drafter (q).

Losslessness needs `process_logits` applied IDENTICALLY to both: the acceptance rule compares
p_i(y) with q_i(y), and q_i must be exactly the distribution the draft token was drawn from.
Temperature 0 is not a distribution; greedy callers use `greedy` (argmax) instead.

Pure torch: no model, Ray or I/O imports. Randomness only through a `torch.Generator`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (on the top-k-renormalised mass), then renormalise.

    logits: (..., V) float, any dtype; -inf entries are allowed (they get probability 0).
    temperature: > 0. top_k: 0 = off, else keep the k largest (ties broken by index order).
    top_p: in (0, 1]; keep the smallest prefix of tokens sorted by probability whose mass
           reaches top_p (the token that crosses the threshold is kept; the argmax always is).
    Returns probs: (..., V) float32, rows sum to 1.
    """
    if not (temperature > 0.0) or math.isinf(temperature):
        # also catches NaN; 0 means greedy, which is argmax and has no distribution here
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    scaled = logits.float() / temperature  # (..., V)
    V = scaled.shape[-1]
    use_k = 0 < top_k < V
    use_p = top_p < 1.0
    if not (use_k or use_p):
        return torch.softmax(scaled, dim=-1)

    # Work in sorted order so both filters are prefix masks; stable sort makes ties
    # deterministic (lower token id first), so p and q truncate identically.
    sorted_l, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # (..., V) x2
    if use_k:
        sorted_l[..., top_k:] = float("-inf")
    if use_p:
        sorted_probs = torch.softmax(sorted_l, dim=-1)                # (..., V)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # keep token j iff the tokens before it have not yet reached top_p: this keeps the
        # crossing token, and position 0 (mass_before = 0 < top_p) so the argmax survives.
        drop = mass_before >= top_p
        drop[..., 0] = False  # guard against float error on a degenerate row
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
    sorted_probs = torch.softmax(sorted_l, dim=-1)                    # (..., V)
    # scatter back: probs[..., order[j]] = sorted_probs[..., j]
    return torch.empty_like(sorted_probs).scatter_(-1, order, sorted_probs)


def sample(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row. probs: (..., V) float, rows sum to 1 (zeros allowed).

    Returns tokens: (...) int64. Reproducible for a given generator state; the generator must
    live on probs' device.
    """
    lead, V = probs.shape[:-1], probs.shape[-1]
    flat = probs.reshape(-1, V)                                       # (N, V)
    if flat.shape[0] == 0:
        return torch.empty(lead, dtype=torch.long, device=probs.device)
    # multinomial never picks a zero-probability entry, so truncated tokens stay impossible
    out = torch.multinomial(flat.float(), num_samples=1, generator=generator)  # (N, 1)
    return out.reshape(lead)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits or probs: (..., V) → (...) int64 argmax (lowest index on ties)."""
    return torch.argmax(logits, dim=-1)
