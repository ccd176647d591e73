"""Configuration of the DEER block-diffusion drafter."""

from __future__ import annotations

from typing import Optional

from transformers import PretrainedConfig

CONTEXT_MODES = ("tokens", "target-features")


class DeerDrafterConfig(PretrainedConfig):
    """Qwen3-style layers; block-causal attention; one forward drafts a whole block.

    context_mode:
      "tokens"           the drafter embeds the verified tokens itself (pure DEER; one drafter
                         can serve any target that shares the tokenizer).
      "target-features"  a verified position's input is a projection of the target's hidden
                         states at that position (DFlash-style); the target returns them with
                         each verify result. Block positions use the drafter's own embeddings.
    target_feature_layers: indices into the target's `hidden_states` tuple (0 = embeddings,
                         L = last layer, already final-normed in Qwen3) whose concatenation is
                         the feature vector; target_feature_dim is its width.
    """

    model_type = "deer_drafter"

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 256,
        intermediate_size: int = 768,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 64,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        mask_token_id: int = 1,
        context_mode: str = "tokens",
        target_feature_layers: Optional[list[int]] = None,
        target_feature_dim: int = 0,
        max_block_size: int = 64,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got {context_mode!r}")
        if context_mode == "target-features" and (not target_feature_layers or target_feature_dim <= 0):
            raise ValueError("target-features mode needs target_feature_layers and target_feature_dim")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.mask_token_id = mask_token_id
        self.context_mode = context_mode
        self.target_feature_layers = list(target_feature_layers or [])
        self.target_feature_dim = target_feature_dim
        self.max_block_size = max_block_size
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
