"""DFlash drafters: z-lab's checkpoint format, run natively by vLLM (`method: dflash`) and SGLang.

The format (config.json + model.safetensors):
  config.json  a Qwen3 config with `architectures: ["DFlashDraftModel"]` and
               `dflash_config = {mask_token_id, target_layer_ids, block_size}`.
  weights      layers.{i}.* (Qwen3 decoder-layer names), norm, fc, hidden_norm. No embeddings and
               no LM head: the drafter uses the target's.

How it drafts (one forward per block, as `dflash/model.py` of z-lab's `dflash` package):
  context   for every verified position t, c_t = hidden_norm(fc(concat_l h_l(t))), where h_l is
            the output of target decoder layer l (0-based; `target_layer_ids`). In EVERY draft
            layer, c_t is projected straight to a key and a value (k_norm(k_proj c_t) rotated at
            position t, v_proj c_t): the context never runs through the layers, so its K/V are
            a per-sequence cache that only grows by newly verified positions.
  block     [anchor, m_1..m_k] (m = mask_token_id), embedded with the target's embedding table,
            at positions j..j+k after j context positions; it attends to the whole context and
            bidirectionally to itself. logits_i = target_head(norm(x_i)) for m_1..m_k.

In `deer_serve`'s words (types.py) this is a `target-features` drafter whose features are
`hidden_states[i + 1]` of a Hugging Face causal LM for i in target_layer_ids (hidden_states[0] is
the embedding output), the same offset vLLM applies to `target_layer_ids`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from deer_serve.models.dflash_format import (ARCHITECTURE, DFlashConfig, DrafterFormatError,  # noqa: F401
                                             build_target_layer_ids, export_dflash,
                                             is_dflash_config, load_target_head, read_config)
from deer_serve.models.modeling_deer import MLP, DrafterCache, RMSNorm, Rotary, rotate_half


class DFlashAttention(nn.Module):
    """Qwen3 attention whose keys/values are [context K/V ; the block's own K/V]."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.nh * self.d, bias=b)
        self.k_proj = nn.Linear(h, self.nkv * self.d, bias=b)
        self.v_proj = nn.Linear(h, self.nkv * self.d, bias=b)
        self.o_proj = nn.Linear(self.nh * self.d, h, bias=b)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, H) -> rotated k and v, each (B, nkv, T, D)."""
        B, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, T, self.nkv, self.d)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return k * c + rotate_half(k) * s, v

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask=None):
        """x (B, T, H) the block; ctx_k/ctx_v (B, nkv, S, D) the context's rotated K/V;
        mask (B, 1, T, S+T) bool or None (all visible)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.d)).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k, v = self.kv(x, cos, sin)
        k, v = torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.d))


class DFlashLayer(nn.Module):
    """Parameter names as z-lab's Qwen3DFlashDecoderLayer (and Hugging Face Qwen3)."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.self_attn = DFlashAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    """A DFlash drafter with the target's embedding table and LM head attached (buffers: not
    part of the checkpoint). `forward` trains every block of a sequence in one pass; `draft_logits`
    / `draft_logits_batch` draft at inference over a per-sequence `DrafterCache` of context K/V
    (the interface `deer_serve.drafters.deer.DeerDrafterBackend` drives)."""

    # the buffers registered in __init__, declared for the type checker (Module.__getattr__
    # would give them as `Tensor | Module`)
    embed_weight: torch.Tensor
    head_weight: torch.Tensor

    def __init__(self, config: DFlashConfig, embed: torch.Tensor, head: torch.Tensor):
        super().__init__()
        if embed.shape[1] != config.hidden_size or head.shape[1] != config.hidden_size:
            raise DrafterFormatError(f"the target's embeddings/head have width {embed.shape[1]}/"
                                     f"{head.shape[1]}, the drafter's hidden size is "
                                     f"{config.hidden_size}")
        self.config = config
        self.layers = nn.ModuleList([DFlashLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fc = nn.Linear(config.target_feature_dim, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("embed_weight", embed.detach().clone(), persistent=False)   # (V, H)
        self.register_buffer("head_weight", head.detach().clone(), persistent=False)     # (V, H)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- pieces ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.head_weight.shape[0])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed_weight)
        s = self.config.input_embedding_scale
        return x if s == 1.0 else x * s

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.norm(h), self.head_weight)
        if self.config.output_multiplier != 1.0:
            out = out * self.config.output_multiplier
        cap = self.config.final_logit_softcapping
        if cap is not None and float(cap) > 0:
            out = torch.tanh(out / float(cap)) * float(cap)
        return out

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """(..., F) target features -> (..., H) the context vectors c_t."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    # ---- training: every block of a sequence in one forward --------------------------------
    def forward(self, context_ids=None, context_features=None, block_ids=None, anchor_pos=None,
                **_):
        """context_features (B, N, F): target features of the whole sequence; block_ids
        (B, nb, k+1) [anchor, m_1..m_k]; anchor_pos (B, nb). Block b sees the context before its
        anchor and its own block. Returns logits (B, nb, k, V) for m_1..m_k."""
        c = self.context(context_features)                                  # (B, N, H)
        B, N, _ = c.shape
        nb, kp1 = block_ids.shape[1], block_ids.shape[2]
        x = self.embed(block_ids).view(B, nb * kp1, -1)                     # (B, nb*(k+1), H)
        dev = x.device
        blk_pos = (anchor_pos[:, :, None] + torch.arange(kp1, device=dev)).view(B, nb * kp1)
        ccos, csin = self.rotary.get(torch.arange(N, device=dev)[None], x.dtype)
        bcos, bsin = self.rotary.get(blk_pos, x.dtype)
        blk_of = torch.arange(nb, device=dev).repeat_interleave(kp1)
        sees_ctx = torch.arange(N, device=dev)[None, None, :] < anchor_pos[:, :, None]   # (B, nb, N)
        mask = torch.cat([sees_ctx.repeat_interleave(kp1, dim=1),
                          (blk_of[:, None] == blk_of[None, :]).expand(B, -1, -1)], 2)
        for layer in self.layers:
            ck, cv = layer.self_attn.kv(c, ccos, csin)                      # (1|B, nkv, N, D)
            x = layer(x, bcos, bsin, ck, cv, mask[:, None])
        return self.logits(x.view(B, nb, kp1, -1)[:, :, 1:])

    # ---- inference ---------------------------------------------------------------------------
    def new_cache(self, capacity: int = 512) -> DrafterCache:
        cache = DrafterCache()
        self._grow(cache, capacity)
        return cache

    def _grow(self, cache: DrafterCache, capacity: int) -> None:
        cfg, p = self.config, self.fc.weight
        shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim)
        new = [(p.new_zeros(shape), p.new_zeros(shape)) for _ in self.layers]
        for (nk, nv), (ok, ov) in zip(new, cache.kv):
            nk[:, :, :cache.length] = ok[:, :, :cache.length]
            nv[:, :, :cache.length] = ov[:, :, :cache.length]
        cache.kv = new

    def _extend(self, caches: Sequence[DrafterCache], feats: Sequence[Optional[torch.Tensor]]) -> None:
        """Append each row's new context features (n_i, F) to its cache: one projection over
        all rows' new positions per layer."""
        rows = [(c, f) for c, f in zip(caches, feats) if f is not None and f.shape[0]]
        if not rows:
            return
        dev = self.fc.weight.device
        c_all = self.context(torch.cat([f.to(dev) for _, f in rows]))[None]     # (1, sum n, H)
        pos = torch.cat([torch.arange(c.length, c.length + f.shape[0], device=dev) for c, f in rows])
        cos, sin = self.rotary.get(pos[None], c_all.dtype)
        for c, f in rows:
            if c.length + f.shape[0] > c.capacity:
                self._grow(c, max(2 * c.capacity, c.length + f.shape[0] + 256))
        # (a ModuleList yields plain Modules to the type checker; these are DFlashLayers)
        for li, layer in enumerate(cast(Sequence[DFlashLayer], self.layers)):
            k, v = layer.self_attn.kv(c_all, cos, sin)                          # (1, nkv, sum n, D)
            o = 0
            for c, f in rows:
                n = f.shape[0]
                c.kv[li][0][:, :, c.length:c.length + n] = k[:, :, o:o + n]
                c.kv[li][1][:, :, c.length:c.length + n] = v[:, :, o:o + n]
                o += n
        for c, f in rows:
            c.length += f.shape[0]

    def _block_ids(self, anchors, prefixes, k):
        j = len(prefixes[0])
        if any(len(p) != j for p in prefixes):
            raise ValueError("all rows of a batch need prefixes of one length")
        ids = torch.full((len(anchors), 1 + j + k), self.config.mask_token_id, dtype=torch.long,
                         device=self.fc.weight.device)
        ids[:, 0] = torch.tensor([int(a) for a in anchors], dtype=torch.long)
        if j:
            ids[:, 1:1 + j] = torch.tensor([[int(t) for t in p] for p in prefixes], dtype=torch.long)
        return ids, j

    @torch.inference_mode()
    def draft_logits(self, cache: DrafterCache, new_ids: Optional[torch.Tensor],
                     new_features: Optional[torch.Tensor], anchor: int, k: int,
                     prefix: Sequence[int] = ()) -> torch.Tensor:
        """Append the new verified context (features (n, F); new_ids is ignored: the context
        is the target's hidden states) and draft the block after `anchor`: logits (k, V).
        prefix: tokens assumed after the anchor, not verified yet (a pipelined pre-draft)."""
        return self.draft_logits_batch([cache], [new_features], [anchor], k, [list(prefix)])[0]

    @torch.inference_mode()
    def draft_logits_batch(self, caches: list, new_srcs: list, anchors: list, k: int,
                           prefixes: Optional[list] = None) -> torch.Tensor:
        """B sequences in one forward: new_srcs[i] (n_i, F) or None; returns logits (B, k, V).
        The rows' context K/V are left-padded to a common length and masked."""
        B = len(caches)
        prefixes = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in caches]
        self._extend(caches, new_srcs)
        ids, j = self._block_ids(anchors, prefixes, k)
        T = ids.shape[1]
        x = self.embed(ids)                                                 # (B, T, H)
        dev = x.device
        Ps = [c.length for c in caches]
        S = max(Ps)
        pos = torch.stack([torch.arange(P, P + T, device=dev) for P in Ps])  # (B, T)
        cos, sin = self.rotary.get(pos, x.dtype)
        mask = None
        if B > 1 and min(Ps) != S:
            mask = torch.ones(B, 1, T, S + T, dtype=torch.bool, device=dev)
            for i, P in enumerate(Ps):
                mask[i, :, :, :S - P] = False
        for li, layer in enumerate(self.layers):
            if B == 1:
                ck, cv = caches[0].kv[li][0][:, :, :S], caches[0].kv[li][1][:, :, :S]
            else:
                ck = torch.cat([F.pad(c.kv[li][0][:, :, :P], (0, 0, S - P, 0)) for c, P in zip(caches, Ps)])
                cv = torch.cat([F.pad(c.kv[li][1][:, :, :P], (0, 0, S - P, 0)) for c, P in zip(caches, Ps)])
            x = layer(x, cos, sin, ck, cv, mask)
        return self.logits(x[:, 1 + j:]).float()                           # (B, k, V)

    # ---- checkpoint ----------------------------------------------------------------------------
    def save_pretrained(self, out, safe_serialization: bool = True, dtype=None) -> None:
        """config.json + model.safetensors in the DFlash format (no embeddings, no head)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: (v if dtype is None else v.to(dtype)).detach().contiguous().cpu()
              for k, v in self.state_dict().items()}
        d = self.config.to_dict()
        d["dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
        (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})


def load_dflash(path, target_dir, device: Optional[str] = None,
                dtype: Optional[torch.dtype] = None) -> DFlashDrafter:
    """A DFlash checkpoint directory + its target's directory -> DFlashDrafter (eval mode).
    Raises DrafterFormatError on a config it cannot serve or one that does not fit the target."""
    from safetensors.torch import load_file

    cfg = DFlashConfig.from_dict(read_config(path))
    cfg.check_target(read_config(target_dir))
    embed, head = load_target_head(target_dir)
    if cfg.vocab_size != head.shape[0]:
        raise DrafterFormatError(f"the drafter's vocabulary ({cfg.vocab_size}) differs from the "
                                 f"target's head ({head.shape[0]})")
    model = DFlashDrafter(cfg, embed, head)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise DrafterFormatError(f"{path}: no *.safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m not in ("embed_weight", "head_weight")]
    if missing or unexpected:
        raise DrafterFormatError(f"{path}: weights do not fit the config (missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return model.to(device=device, dtype=dtype).eval()


def make_tiny_dflash(target, target_layer_ids: Sequence[int], num_layers: int = 2,
                     mask_token_id: int = 1, block_size: int = 16, seed: int = 0) -> DFlashDrafter:
    """A random DFlash drafter fitted to the Hugging Face causal LM `target` (tests)."""
    tc = target.config.get_text_config()
    torch.manual_seed(seed)
    cfg = DFlashConfig(
        vocab_size=int(tc.vocab_size), hidden_size=int(tc.hidden_size),
        intermediate_size=int(tc.intermediate_size), num_hidden_layers=num_layers,
        num_attention_heads=int(tc.num_attention_heads),
        num_key_value_heads=int(tc.num_key_value_heads),
        head_dim=int(getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads),
        target_layer_ids=list(target_layer_ids), mask_token_id=mask_token_id,
        block_size=block_size, num_target_layers=int(tc.num_hidden_layers),
        rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
        rope_theta=float((getattr(tc, "rope_parameters", None) or {}).get("rope_theta", 1e4)),
        max_position_embeddings=int(tc.max_position_embeddings))
    model = DFlashDrafter(cfg, target.get_input_embeddings().weight,
                          target.get_output_embeddings().weight)
    with torch.no_grad():  # norms away from 1 so a wrong norm shows in tests
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    return model.eval()

