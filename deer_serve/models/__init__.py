"""Models of deer-serve. Importing this registers DeerDrafter with the Auto classes."""

from transformers import AutoConfig, AutoModel

from deer_serve.models.configuration_deer import CONTEXT_MODES, DeerDrafterConfig
from deer_serve.models.modeling_deer import DeerDrafter, DrafterCache, make_tiny_drafter

AutoConfig.register(DeerDrafterConfig.model_type, DeerDrafterConfig, exist_ok=True)
AutoModel.register(DeerDrafterConfig, DeerDrafter, exist_ok=True)

__all__ = ["CONTEXT_MODES", "DeerDrafterConfig", "DeerDrafter", "DrafterCache", "make_tiny_drafter"]
