"""DeerDrafter: a block-diffusion drafter with Qwen3-style layers.

One sequence is a causal *context stream* (verified positions: token embeddings, or projected
target features) plus *blocks*. A block is [anchor, m_1 .. m_k]: the anchor is the last token
(sampled, not yet verified), m_i are `<|mask|>` tokens (or, in Stage I training, sometimes the
true token). A block attends to the context before its anchor and bidirectionally to itself
(the block-causal mask of BD3-LM); one forward fills all k positions (single-step drafting).

Inference keeps the context stream's KV per sequence in a `DrafterCache`; each draft call runs
the newly verified context positions and the block in ONE forward and extends the cache by the
context positions only. Training runs every block of a sequence in one forward (`forward`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel

from deer_serve.models.configuration_deer import DeerDrafterConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op, the same numbers (half the time of the ops below on a CPU)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary:
    """cos/sin tables, computed once per device and grown on demand (not a module buffer, so
    meta-device initialisation in `from_pretrained` never leaves them empty). Same layout as
    Hugging Face Qwen3 (frequencies duplicated), so layers copied from a target keep working."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None

    def get(self, positions: torch.Tensor, dtype: torch.dtype):
        n = int(positions.max()) + 1
        if self.cos is None or self.cos.shape[0] < n or self.cos.device != positions.device:
            size = max(n, 2 * (0 if self.cos is None else self.cos.shape[0]), 1024)
            inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=positions.device,
                                                     dtype=torch.float32) / self.head_dim))
            freqs = torch.outer(torch.arange(size, device=positions.device, dtype=torch.float32), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        assert self.cos is not None and self.sin is not None  # set above when they were None
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)  # (..., T, D)


class Attention(nn.Module):
    def __init__(self, cfg: DeerDrafterConfig):
        super().__init__()
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.nh * self.d, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.d, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.nh * self.d, h, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_buf=None, start=0):
        """x (B, T, H); cos/sin (B, T, D); mask (B, 1, T, S) bool, True = attend.
        kv_buf: inference only, a (k_buf, v_buf) pair of (1, nkv, cap, D) tensors: this call's
        K/V are written at [start, start+T) and attention reads [0, start+T)."""
        q, k, v = self.project(x, cos, sin)
        T = x.shape[1]
        if kv_buf is not None:
            kb, vb = kv_buf
            kb[:, :, start:start + T] = k
            vb[:, :, start:start + T] = v
            k, v = kb[:, :, :start + T], vb[:, :, :start + T]
        return self.attend(q, k, v, mask)

    def project(self, x, cos, sin):
        """x (B, T, H) -> rotated q (B, nh, T, D), k and v (B, nkv, T, D)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.nkv, self.d)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                  # (B, 1, T, D)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def attend(self, q, k, v, mask):
        B, _, T, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.d))


class MLPDims(Protocol):
    """What `MLP` reads from a config: DeerDrafterConfig or dflash's DFlashConfig."""

    hidden_size: int
    intermediate_size: int


class MLP(nn.Module):
    def __init__(self, cfg: MLPDims):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Parameter names match Hugging Face Qwen3DecoderLayer, so target layers can be copied in."""

    def __init__(self, cfg: DeerDrafterConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_buf=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_buf, start)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class DrafterCache:
    """Per-sequence context KV: one (k, v) pair of (1, nkv, capacity, D) buffers per layer.
    `length` positions are valid; the block's scratch K/V live just past them and are
    overwritten by the next call (rolling back = moving `length`, never copying)."""

    kv: list = field(default_factory=list)
    length: int = 0
    token_ids: list = field(default_factory=list)  # the context ids the valid KV stands for

    @property
    def capacity(self) -> int:
        return self.kv[0][0].shape[2] if self.kv else 0


class DeerDrafter(PreTrainedModel):
    config_class = DeerDrafterConfig
    base_model_prefix = "deer"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: DeerDrafterConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.context_mode == "target-features":
            self.feature_proj = nn.Linear(config.target_feature_dim, config.hidden_size, bias=False)
            self.feature_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    # ---- shared pieces -------------------------------------------------------------------
    def embed_context(self, ids: Optional[torch.Tensor], features: Optional[torch.Tensor]):
        """(B, N) ids or (B, N, F) target features -> (B, N, H) context-stream inputs."""
        if self.config.context_mode == "target-features":
            assert features is not None, "context_mode 'target-features' reads target features"
            return self.feature_norm(self.feature_proj(features.to(self.embed_tokens.weight.dtype)))
        return self.embed_tokens(ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(h), self.embed_tokens.weight)  # tied head

    # ---- training: every block of a sequence in one forward --------------------------------
    def forward(self, context_ids=None, context_features=None, block_ids=None, anchor_pos=None,
                **_):
        """context_ids (B, N) / context_features (B, N, F): the whole sequence's context stream.
        block_ids (B, nb, k+1): [anchor, m_1..m_k] per block (m_i = mask id or, in Stage I, the
        true token); anchor_pos (B, nb): position of each anchor. Block b sees context
        positions < anchor_pos[b] and its own block. Returns logits (B, nb, k, V) for m_1..m_k."""
        ctx = self.embed_context(context_ids, context_features)             # (B, N, H)
        B, N, _ = ctx.shape
        nb, kp1 = block_ids.shape[1], block_ids.shape[2]
        blk = self.embed_tokens(block_ids).view(B, nb * kp1, -1)            # (B, nb*(k+1), H)
        x = torch.cat([ctx, blk], dim=1)
        dev = x.device
        ctx_pos = torch.arange(N, device=dev).expand(B, N)
        blk_pos = (anchor_pos[:, :, None] + torch.arange(kp1, device=dev)).view(B, nb * kp1)
        pos = torch.cat([ctx_pos, blk_pos], dim=1)                          # (B, T)
        mask = self._train_mask(N, anchor_pos, kp1)                         # (B, 1, T, T)
        cos, sin = self.rotary.get(pos, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        h = x[:, N:].view(B, nb, kp1, -1)[:, :, 1:]                         # (B, nb, k, H)
        return self.logits(h)

    @staticmethod
    def _train_mask(N: int, anchor_pos: torch.Tensor, kp1: int) -> torch.Tensor:
        B, nb = anchor_pos.shape
        dev = anchor_pos.device
        T = N + nb * kp1
        mask = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
        mask[:, :N, :N] = torch.ones(N, N, dtype=torch.bool, device=dev).tril()
        blk_of = torch.arange(nb, device=dev).repeat_interleave(kp1)        # (nb*(k+1),)
        mask[:, N:, N:] = blk_of[:, None] == blk_of[None, :]
        sees_ctx = torch.arange(N, device=dev)[None, None, :] < anchor_pos[:, :, None]  # (B, nb, N)
        mask[:, N:, :N] = sees_ctx.repeat_interleave(kp1, dim=1)
        return mask.unsqueeze(1)

    # ---- inference: extend the cached context and draft one block, in one forward ----------
    def new_cache(self, capacity: int = 512) -> DrafterCache:
        cache = DrafterCache()
        self._grow(cache, capacity)
        return cache

    def _grow(self, cache: DrafterCache, capacity: int) -> None:
        cfg, p = self.config, self.embed_tokens.weight
        shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim)
        new = [(torch.zeros(shape, dtype=p.dtype, device=p.device),
                torch.zeros(shape, dtype=p.dtype, device=p.device)) for _ in self.layers]
        for (nk, nv), (ok, ov) in zip(new, cache.kv):
            nk[:, :, :cache.length] = ok[:, :, :cache.length]
            nv[:, :, :cache.length] = ov[:, :, :cache.length]
        cache.kv = new

    @torch.inference_mode()
    def draft_logits(self, cache: DrafterCache, new_ids: Optional[torch.Tensor],
                     new_features: Optional[torch.Tensor], anchor: int, k: int,
                     prefix: Sequence[int] = ()) -> torch.Tensor:
        """Append n new verified context positions (new_ids (n,) or new_features (n, F)) to
        `cache`, and draft the block after `anchor`. Returns logits (k, V) for m_1..m_k.

        prefix: j tokens assumed to follow the anchor that are not verified yet (a pipelined
        pre-draft): the block is [anchor, prefix, m_1..m_k] with the prefix as token
        embeddings (as Stage I's revealed block tokens), and the k masks come after it."""
        P = cache.length
        dev = self.embed_tokens.weight.device
        src = new_ids if self.config.context_mode == "tokens" else new_features
        n = 0 if src is None else int(src.shape[0])
        j = len(prefix)
        blk_ids = torch.full((1 + j + k,), self.config.mask_token_id, dtype=torch.long, device=dev)
        blk_ids[0] = anchor
        if j:
            blk_ids[1:1 + j] = torch.tensor([int(t) for t in prefix], dtype=torch.long, device=dev)
        blk = self.embed_tokens(blk_ids)[None]                               # (1, 1+j+k, H)
        if n:
            ctx = self.embed_context(None if new_ids is None else new_ids.to(dev)[None],
                                     None if new_features is None else new_features.to(dev)[None])
            x = torch.cat([ctx, blk], dim=1)                                 # (1, n+1+j+k, H)
        else:
            x = blk
        T = n + 1 + j + k
        if P + T > cache.capacity:
            self._grow(cache, max(2 * cache.capacity, P + T + 256))
        pos = torch.arange(P, P + T, device=dev)                             # anchor at P+n
        # queries: n context (causal over cache + themselves), then the block (sees everything)
        mask = torch.ones(T, P + T, dtype=torch.bool, device=dev)
        if n:
            mask[:n, P:] = torch.ones(n, T, dtype=torch.bool, device=dev).tril()
        cos, sin = self.rotary.get(pos[None], x.dtype)
        for layer, kv in zip(self.layers, cache.kv):
            x = layer(x, cos, sin, mask[None, None], kv, P)
        cache.length = P + n
        return self.logits(x[0, n + 1 + j:]).float()                         # (k, V)

    @torch.inference_mode()
    def draft_logits_batch(self, caches: list, new_srcs: list, anchors: list, k: int,
                           prefixes: Optional[list] = None) -> torch.Tensor:
        """`draft_logits` for B sequences in ONE forward. new_srcs[i]: the new verified context
        of row i (ids (n_i,) in tokens mode, features (n_i, F) in target-features mode, or None).
        prefixes: per row, the unverified tokens after its anchor (all of one length j).
        Rows are left-padded so every block sits at the end; cached context KV is left-padded
        to a common length and a per-row mask hides all padding. Returns logits (B, k, V)."""
        B = len(caches)
        dev = self.embed_tokens.weight.device
        cfg = self.config
        tokens_mode = cfg.context_mode == "tokens"
        ns = [0 if s is None else int(s.shape[0]) for s in new_srcs]
        Ps = [c.length for c in caches]
        nmax, Pmax = max(ns), max(Ps)
        prefixes = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in caches]
        j = len(prefixes[0])
        if any(len(p) != j for p in prefixes):
            raise ValueError("all rows of a batch need prefixes of one length")
        kb = j + k                                               # block positions after the anchor
        Tm = nmax + kb + 1
        blk_ids = torch.full((B, kb + 1), cfg.mask_token_id, dtype=torch.long, device=dev)
        blk_ids[:, 0] = torch.tensor([int(a) for a in anchors], device=dev)
        if j:
            blk_ids[:, 1:1 + j] = torch.tensor([[int(t) for t in p] for p in prefixes], device=dev)
        x = torch.zeros(B, Tm, cfg.hidden_size, dtype=self.embed_tokens.weight.dtype, device=dev)
        x[:, nmax:] = self.embed_tokens(blk_ids)
        pos = torch.zeros(B, Tm, dtype=torch.long, device=dev)
        mask = torch.zeros(B, Tm, Pmax + Tm, dtype=torch.bool, device=dev)
        causal = torch.ones(Tm, Tm, dtype=torch.bool, device=dev).tril()
        for i, (src, n, P) in enumerate(zip(new_srcs, ns, Ps)):
            s0 = nmax - n                                        # first valid query of row i
            if n:
                src = src.to(dev)
                x[i, s0:nmax] = self.embed_context(src[None] if tokens_mode else None,
                                                   None if tokens_mode else src[None])[0]
            pos[i, s0:] = torch.arange(P, P + n + kb + 1, device=dev)
            mask[i, s0:, Pmax - P:Pmax] = True                   # the row's cached context
            mask[i, s0:nmax, Pmax + s0:Pmax + nmax] = causal[:n, :n]
            mask[i, nmax:, Pmax + s0:] = True                    # the block sees all of it
            mask[i, :s0, Pmax:Pmax + s0] = torch.eye(s0, dtype=torch.bool, device=dev)  # padding
        cos, sin = self.rotary.get(pos, x.dtype)
        # (a ModuleList yields plain Modules to the type checker; these are DecoderLayers)
        for li, layer in enumerate(cast(Sequence[DecoderLayer], self.layers)):
            a = layer.self_attn
            q, kk, vv = a.project(layer.input_layernorm(x), cos, sin)
            if Pmax:
                pk = torch.cat([F.pad(c.kv[li][0][:, :, :P], (0, 0, Pmax - P, 0)) for c, P in zip(caches, Ps)])
                pv = torch.cat([F.pad(c.kv[li][1][:, :, :P], (0, 0, Pmax - P, 0)) for c, P in zip(caches, Ps)])
                K, V = torch.cat([pk, kk], 2), torch.cat([pv, vv], 2)
            else:
                K, V = kk, vv
            x = x + a.attend(q, K, V, mask[:, None])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            for i, (c, n, P) in enumerate(zip(caches, ns, Ps)):   # keep the new context KV
                if not n:
                    continue
                if P + n + kb + 1 > c.capacity:
                    self._grow(c, max(2 * c.capacity, P + n + kb + 1 + 256))
                c.kv[li][0][:, :, P:P + n] = kk[i:i + 1, :, nmax - n:nmax]
                c.kv[li][1][:, :, P:P + n] = vv[i:i + 1, :, nmax - n:nmax]
        for c, n in zip(caches, ns):
            c.length += n
        return self.logits(x[:, nmax + 1 + j:]).float()                     # (B, k, V)


def make_tiny_drafter(target_config, context_mode: str = "tokens", seed: int = 0,
                      hidden_size: int = 64, num_layers: int = 2,
                      feature_layers: Optional[list[int]] = None) -> DeerDrafter:
    """A random drafter that fits `target_config` (vocab), for tests."""
    if feature_layers is None:
        L = target_config.num_hidden_layers
        feature_layers = [max(1, L // 2), L]
    torch.manual_seed(seed)
    cfg = DeerDrafterConfig(
        vocab_size=target_config.vocab_size, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=max(8, hidden_size // 2),
        mask_token_id=1, context_mode=context_mode,
        target_feature_layers=feature_layers if context_mode == "target-features" else None,
        target_feature_dim=len(feature_layers) * target_config.hidden_size
        if context_mode == "target-features" else 0,
    )
    return DeerDrafter(cfg).eval()
