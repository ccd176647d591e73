"""DEER's acceptance rule: pure, batched over rows with different draft lengths.

Words (as in the DEER paper and vLLM's rejection sampler):
  p    the TARGET's processed distributions p_1..p_{k+1}; p_i is conditioned on the verified
       prefix and the drafts y_1..y_{i-1}. (gpt-fast swaps the names: its `p` is the drafter
       and its `q` the target. Here p is always the target.)
  q    the DRAFTER's processed distributions q_1..q_k; y_i was drawn from q_i.
  y_i  draft tokens; a row b has draft_lens[b] <= k real drafts, the rest is padding.
  output of one cycle = accepted + recovered + bonus:
       accepted   the leading drafts y_1..y_n kept (n = n_accepted),
       recovered  the correction sampled at the first rejection, from norm(max(0, p - q)),
       bonus      sampled from p_{n+1} when all draft_lens[b] drafts were accepted.
  Exactly one of recovered / bonus is emitted per row: `next_token`.

Why it is lossless: accepting y ~ q with prob min(1, p(y)/q(y)) emits y with prob min(p, q)(y);
a rejection happens with prob 1 - sum(min(p, q)) = sum(max(0, p - q)), and then the
correction emits max(0, p - q)(y) / that mass. The sum is p(y).

Randomness only comes in through `generator`: uniforms of fixed shape (B, k) first, then one
draw per row, so a seed fixes the outcome. No Python loops over positions: the accepted length
is the `cumprod` of the per-position accept mask (as in z-lab/dflash).
"""

from __future__ import annotations

from typing import Optional

import torch

from deer_serve.sampling import sample


def _check(draft_tokens: torch.Tensor, draft_lens: torch.Tensor, n_next: int) -> tuple[int, int]:
    # shape checks only: host-side metadata, no device sync
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be (B, k), got {tuple(draft_tokens.shape)}")
    B, k = draft_tokens.shape
    if tuple(draft_lens.shape) != (B,):
        raise ValueError(f"draft_lens must be ({B},), got {tuple(draft_lens.shape)}")
    if n_next != k + 1:
        raise ValueError(f"target rows must cover k+1 = {k + 1} positions, got {n_next}")
    return B, k


def _accepted_length(accept: torch.Tensor, draft_lens: torch.Tensor) -> torch.Tensor:
    """accept: (B, k) bool per-position verdicts; draft_lens: (B,) → (B,) int64 leading run
    of accepts within the real drafts (padding counts as a rejection, so it stops the run)."""
    k = accept.shape[1]
    valid = torch.arange(k, device=accept.device) < draft_lens.unsqueeze(1)  # (B, k)
    return (accept & valid).long().cumprod(dim=1).sum(dim=1)                # (B,)


def accept_greedy(draft_tokens: torch.Tensor, draft_lens: torch.Tensor,
                  target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0: accept while y_i == argmax p_i; the next token is argmax p_{n+1}.

    draft_tokens:  (B, k) int64 y_1..y_k; entries at i >= draft_lens[b] are ignored.
    draft_lens:    (B,) int64 in [0, k].
    target_argmax: (B, k+1) int64 argmax of p_1..p_{k+1}.
    Returns n_accepted (B,) int64 and next_token (B,) int64 (correction, or bonus when
    n_accepted == draft_lens).
    """
    B, k = _check(draft_tokens, draft_lens, target_argmax.shape[1])
    match = draft_tokens == target_argmax[:, :k]                    # (B, k)
    n_accepted = _accepted_length(match, draft_lens)                # (B,)
    next_token = target_argmax.gather(1, n_accepted.unsqueeze(1)).squeeze(1)  # (B,)
    return n_accepted, next_token


def accept_speculative(draft_tokens: torch.Tensor, draft_lens: torch.Tensor,
                       q_probs: Optional[torch.Tensor], p_probs: torch.Tensor,
                       generator: Optional[torch.Generator] = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. / Chen et al.), as used by DEER.

    draft_tokens: (B, k) int64 y_1..y_k; entries at i >= draft_lens[b] are ignored.
    draft_lens:   (B,) int64 in [0, k].
    q_probs:      (B, k, V) float q_1..q_k, processed exactly like p (`process_logits`);
                  rows beyond draft_lens are ignored. None = deterministic proposal (q_i
                  one-hot at y_i, e.g. prompt-lookup candidates).
    p_probs:      (B, k+1, V) float p_1..p_{k+1}, processed.
    generator:    the only source of randomness; on the tensors' device.
    Returns n_accepted (B,) int64 and next_token (B,) int64: the correction sampled from
    norm(max(0, p_{n+1} - q_{n+1})) if a draft was rejected, else the bonus from p_{n+1}
    (n = n_accepted, 0-based row index n).
    """
    B, k = _check(draft_tokens, draft_lens, p_probs.shape[1])
    V = p_probs.shape[2]
    if q_probs is not None and tuple(q_probs.shape) != (B, k, V):
        raise ValueError(f"q_probs must be {(B, k, V)}, got {tuple(q_probs.shape)}")
    device = p_probs.device
    y = draft_tokens.unsqueeze(2)                                   # (B, k, 1)

    # 1. Accept y_i with prob min(1, p_i(y_i) / q_i(y_i)), tested as u * q < p so that q = 0
    #    needs no division and p = 0 always rejects. u in [0, 1) so p >= q always accepts.
    p_y = p_probs[:, :k].gather(2, y).squeeze(2).float()           # (B, k)
    q_y = (q_probs.gather(2, y).squeeze(2).float() if q_probs is not None
           else torch.ones_like(p_y))                               # (B, k); one-hot: q_i(y_i)=1
    u = torch.rand((B, k), generator=generator, device=device)     # (B, k), always drawn
    n_accepted = _accepted_length(u * q_y < p_y, draft_lens)       # (B,)

    # 2. Distribution of the one emitted token at row position n = n_accepted.
    rejected = n_accepted < draft_lens                              # (B,) bool
    rows = torch.arange(B, device=device)
    p_n = p_probs[rows, n_accepted].float()                         # (B, V) p_{n+1}
    # q exists only at positions < k; rows that accepted everything use p_n, so clamp for them
    q_pos = n_accepted.clamp(max=max(k - 1, 0))                     # (B,)
    if k == 0:
        q_n = torch.zeros_like(p_n)                                  # no drafts: bonus only
    elif q_probs is not None:
        q_n = q_probs[rows, q_pos].float()                          # (B, V) q_{n+1}
    else:
        y_n = draft_tokens[rows, q_pos].unsqueeze(1)                # (B, 1)
        q_n = torch.zeros_like(p_n).scatter_(1, y_n, 1.0)           # (B, V) one-hot
    residual = (p_n - q_n).clamp_(min=0.0)                          # (B, V)
    mass = residual.sum(dim=1, keepdim=True)                        # (B, 1)
    # mass == 0 means p <= q everywhere, i.e. p == q up to rounding: rejection had prob ~0,
    # and p itself is then the right distribution.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_n)
    dist = torch.where(rejected.unsqueeze(1), residual, p_n)        # (B, V)
    next_token = sample(dist, generator)                            # (B,)
    return n_accepted, next_token
