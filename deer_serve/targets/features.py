"""Target features for `target-features` drafters: one definition for training and serving.

feature(t) = concat(hidden_states[l][t] for l in layers), where `hidden_states` is the tuple a
Hugging Face causal LM returns with `output_hidden_states=True` (0 = embeddings, L = the last
layer; in Qwen3 the last one is already final-normed).
"""

from __future__ import annotations

from typing import Sequence

import torch


def default_feature_layers(num_layers: int) -> list[int]:
    """The middle layer and the last (normed) layer."""
    return [max(1, num_layers // 2), num_layers]


def select_features(hidden_states: Sequence[torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """hidden_states: tuple of (B, T, H) -> (B, T, len(layers) * H)."""
    return torch.cat([hidden_states[l] for l in layers], dim=-1)
