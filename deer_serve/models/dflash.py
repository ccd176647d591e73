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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from deer_serve.models.modeling_deer import MLP, DrafterCache, RMSNorm, Rotary, rotate_half

ARCHITECTURE = "DFlashDraftModel"


class DrafterFormatError(ValueError):
    """A drafter checkpoint that cannot be served (bad or unsupported config, or a mismatch
    with its target). The CLI reports it with exit code 2."""


def is_dflash_config(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    return "dflash_config" in cfg or any("DFlash" in str(a) for a in archs)


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference's default when a checkpoint names no layers: evenly from 1 to L-3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [round(start + i * (end - start) / (num_draft_layers - 1)) for i in range(num_draft_layers)]


@dataclass
class DFlashConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    target_layer_ids: list[int]
    mask_token_id: int
    block_size: int = 16                      # the block it was trained for (k = block_size - 1)
    num_target_layers: Optional[int] = None
    target_hidden_size: Optional[int] = None  # None = hidden_size
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    input_embedding_scale: float = 1.0        # block embeddings = target embedding * this
    output_multiplier: float = 1.0            # logits = target head * this (then the soft cap)
    final_logit_softcapping: Optional[float] = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    # ---- what deer_serve's engine and target backends read ---------------------------------
    context_mode = "target-features"

    @property
    def target_feature_layers(self) -> list[int]:
        """Indices into a Hugging Face `hidden_states` tuple (0 = embeddings)."""
        return [i + 1 for i in self.target_layer_ids]

    @property
    def target_feature_dim(self) -> int:
        return len(self.target_layer_ids) * (self.target_hidden_size or self.hidden_size)

    # ---- config.json -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "DFlashConfig":
        archs = [str(a) for a in d.get("architectures") or []]
        dc = dict(d.get("dflash_config") or {})
        if any(a.startswith("DFlash2") for a in archs) or "conv_kernel_size" in dc \
                or "selector_rank" in dc:
            raise DrafterFormatError("DFlash2 drafters (candidate selector, convolutions) are "
                                     "not supported")
        if dc.get("use_swa") or any(t == "sliding_attention" for t in d.get("layer_types") or []):
            raise DrafterFormatError("DFlash drafters with sliding-window layers are not supported")
        if d.get("is_causal") or dc.get("causal"):
            raise DrafterFormatError("causal DFlash drafters are not supported")

        def pick(name, default=None):
            return dc.get(name, d.get(name, default))

        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", None):
            raise DrafterFormatError(f"rope type {rtype!r} is not supported (only default RoPE)")
        theta = rope.get("rope_theta", d.get("rope_theta", 1e6))
        try:
            L = int(d["num_hidden_layers"])
            layer_ids = pick("target_layer_ids")
            n_target = pick("num_target_layers")
            if layer_ids is None:
                if n_target is None:
                    raise DrafterFormatError("dflash_config names no target_layer_ids (and no "
                                             "num_target_layers to derive them from)")
                layer_ids = build_target_layer_ids(int(n_target), L)
            if not isinstance(layer_ids, (list, tuple)) or not layer_ids \
                    or any(not isinstance(i, int) or i < 0 for i in layer_ids):
                raise DrafterFormatError(f"dflash_config.target_layer_ids must be a non-empty "
                                         f"list of layer indices >= 0, got {layer_ids!r}")
            mask = pick("mask_token_id")
            if mask is None:
                raise DrafterFormatError("dflash_config has no mask_token_id")
            H = int(d["hidden_size"])
            nh = int(d["num_attention_heads"])
            known = {"architectures", "dflash_config", "vocab_size", "hidden_size",
                     "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                     "rope_parameters", "max_position_embeddings", "attention_bias",
                     "num_target_layers", "target_hidden_size", "block_size"}
            return cls(
                vocab_size=int(d["vocab_size"]), hidden_size=H,
                intermediate_size=int(d["intermediate_size"]), num_hidden_layers=L,
                num_attention_heads=nh, num_key_value_heads=int(d.get("num_key_value_heads", nh)),
                head_dim=int(d.get("head_dim") or H // nh),
                target_layer_ids=[int(i) for i in layer_ids], mask_token_id=int(mask),
                block_size=int(pick("block_size", 16)),
                num_target_layers=None if n_target is None else int(n_target),
                target_hidden_size=d.get("target_hidden_size"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
                attention_bias=bool(d.get("attention_bias", False)),
                input_embedding_scale=float(pick("input_embedding_scale", 1.0)),
                output_multiplier=float(pick("output_multiplier", 1.0)),
                final_logit_softcapping=pick("final_logit_softcapping"),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except KeyError as e:
            raise DrafterFormatError(f"DFlash config.json lacks {e.args[0]!r}") from None

    def to_dict(self) -> dict:
        """A config.json that z-lab's `DFlashDraftModel` and vLLM's `method: dflash` load."""
        d = dict(self.extra)
        d.update({
            "architectures": [ARCHITECTURE], "model_type": "qwen3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias, "tie_word_embeddings": False,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "use_sliding_window": False, "sliding_window": None,
            "dflash_config": {"mask_token_id": self.mask_token_id,
                              "target_layer_ids": list(self.target_layer_ids),
                              "block_size": self.block_size},
        })
        if self.num_target_layers is not None:
            d["num_target_layers"] = self.num_target_layers
        if self.target_hidden_size is not None:
            d["target_hidden_size"] = self.target_hidden_size
        for name, default in (("input_embedding_scale", 1.0), ("output_multiplier", 1.0)):
            if getattr(self, name) != default:
                d["dflash_config"][name] = getattr(self, name)
        if self.final_logit_softcapping is not None:
            d["dflash_config"]["final_logit_softcapping"] = self.final_logit_softcapping
        return d

    def check_target(self, target_cfg: dict) -> None:
        """Raise DrafterFormatError when this drafter cannot read `target_cfg`'s model (its
        config.json as a dict; a `text_config` inside is used when present)."""
        t = target_cfg.get("text_config") or target_cfg
        L, H, V = t.get("num_hidden_layers"), t.get("hidden_size"), t.get("vocab_size")
        bad = [i for i in self.target_layer_ids if L is not None and i >= L]
        if L is not None and bad:
            raise DrafterFormatError(f"dflash_config.target_layer_ids {bad} are past the target's "
                                     f"depth ({L} layers: ids 0..{L - 1})")
        th = self.target_hidden_size or self.hidden_size
        if H is not None and th != H:
            raise DrafterFormatError(f"the drafter reads target hidden states of size {th}, the "
                                     f"target's hidden size is {H}")
        if H is not None and self.hidden_size != H:
            raise DrafterFormatError(f"the drafter's hidden size {self.hidden_size} differs from "
                                     f"the target's {H} (it uses the target's embeddings and head)")
        if V is not None and self.vocab_size > V:
            raise DrafterFormatError(f"the drafter's vocabulary ({self.vocab_size}) is larger "
                                     f"than the target's ({V})")
        if V is not None and not 0 <= self.mask_token_id < V:
            raise DrafterFormatError(f"mask_token_id {self.mask_token_id} is outside the "
                                     f"target's vocabulary ({V})")


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


def read_config(path) -> dict:
    p = Path(path) / "config.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise DrafterFormatError(f"{path}: no config.json") from None
    except json.JSONDecodeError as e:
        raise DrafterFormatError(f"{p}: not valid JSON ({e})") from None


def load_target_head(target_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """(embed (V, H), head (V, H)) of a Hugging Face causal LM directory, read from its
    safetensors without loading its layers (tied embeddings: head = embed). Falls back to
    loading the model when the weights are not in safetensors or use unknown names."""
    from safetensors import safe_open

    target_dir = Path(target_dir)
    index = target_dir / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]                # name -> file
    elif (target_dir / "model.safetensors").is_file():
        with safe_open(str(target_dir / "model.safetensors"), "pt") as f:
            where = {k: "model.safetensors" for k in f.keys()}
    else:
        where = {}

    def find(suffixes):
        for s in suffixes:
            hits = sorted(k for k in where if k == s or k.endswith("." + s))
            if hits:
                return hits[0]
        return None

    e = find(["embed_tokens.weight", "embed_in.weight", "wte.weight", "word_embeddings.weight"])
    h = find(["lm_head.weight", "embed_out.weight"])
    if e is not None:
        def load(name):
            with safe_open(str(target_dir / where[name]), "pt") as f:
                return f.get_tensor(name).float()
        embed = load(e)
        return embed, (load(h) if h is not None else embed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    return (model.get_input_embeddings().weight.detach().clone(),
            model.get_output_embeddings().weight.detach().clone())


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


def export_dflash(src, dst, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Copy a DFlash checkpoint to `dst` with its weights cast to `dtype` (config.json's
    `dtype` follows): what vLLM's `method: dflash` and z-lab's loader read. No target needed."""
    from safetensors.torch import load_file, save_file

    cfg = DFlashConfig.from_dict(read_config(src))          # validates the format
    files = sorted(Path(src).glob("*.safetensors"))
    if not files:
        raise DrafterFormatError(f"{src}: no *.safetensors weights")
    sd = {}
    for f in files:
        sd.update({k.removeprefix("model."): v.to(dtype).contiguous() for k, v in load_file(str(f)).items()})
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    d["dtype"] = str(dtype).replace("torch.", "")
    (dst / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
