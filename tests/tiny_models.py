"""Tiny models for tests: a byte-level BPE tokenizer and random Qwen3 targets, made from seeds.

A module of its own (not conftest.py) so test files can import it by a unique name: pytest
loads several conftest.py files, and `from conftest import ...` may find the wrong one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests run from a checkout without an installed package too
    sys.path.insert(0, str(REPO))

# One thread: the 2 cores are shared with a training job, and OpenMP threads that wait on a
# descheduled sibling make tiny forwards 10-50x slower.
torch.set_num_threads(1)

TOKENIZER_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(main())\n",
    "The quick brown fox jumps over the lazy dog. Hello, world!\n",
    "while True:\n    line = f.readline()\n    if not line:\n        break\n",
]


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE as a `PreTrainedTokenizerFast`: <|endoftext|> = 0, <|mask|> = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|mask|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(TOKENIZER_TEXTS * 4, trainer=trainer)
    assert raw.token_to_id("<|endoftext|>") == 0 and raw.token_to_id("<|mask|>") == 1
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", mask_token="<|mask|>",
                                   clean_up_tokenization_spaces=False)


def make_target(vocab_size: int = 300, layers: int = 2, hidden: int = 64, seed: int = 0,
                head_scale: float = 1.0, eos_token_id: int | None = 0):
    """A tiny random Qwen3ForCausalLM (CPU float32). head_scale > 1 sharpens its distributions."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    heads = max(2, hidden // 16)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
                      max_position_embeddings=1024, tie_word_embeddings=head_scale == 1.0,
                      eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=0)
    model = Qwen3ForCausalLM(cfg).eval()
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.02 * head_scale)
    return model


