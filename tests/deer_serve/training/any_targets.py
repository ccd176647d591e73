"""Tiny random targets of architectures other than Qwen3, each with its own tiny tokenizer,
saved as a user would hand them to `deer-serve train drafter` (made from seeds, nothing
downloaded).

  llama  LlamaForCausalLM; a tokenizer WITH its own mask token ("[MASK]", not <|mask|>)
  gpt2   GPT2LMHeadModel; a tokenizer WITHOUT a mask token, the model has 8 spare rows
  neox   GPTNeoXForCausalLM; no mask token, spare rows, untied head
  full   GPT2LMHeadModel whose tokenizer has no mask token and fills every row (refused)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tiny_models import TOKENIZER_TEXTS  # noqa: E402

PROMPT_TEXTS = [
    "def add(a, b):\n    return",
    "for i in range(10):\n    print(",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n",
    "The quick brown fox jumps over the lazy dog.",
    "while True:\n    line = f.readline()\n    if not line:\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "x = [i * i for i in range(",
    "Hello, world! The dog",
    "class Stack:\n    def push(self, item):\n",
    "if x > 0:\n    y = x\nelse:\n",
    "print('hello')\nprint(",
    "def main():\n    args = sys.argv[1:]\n",
    "import os\nfor name in os.listdir('.'):\n",
    "x = 1",                    # shorter than a prompt length: continued further
    "def f(",
]


def build_bpe(specials: list[str], vocab_size: int = 300, **named):
    """A byte-level BPE `PreTrainedTokenizerFast` (as tests/tiny_models.build_tokenizer) whose
    special tokens are `specials` (ids 0..); named: eos_token=..., mask_token=..., ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(TOKENIZER_TEXTS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, clean_up_tokenization_spaces=False, **named)


def make_llama(out: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_bpe(["</s>", "[MASK]"], eos_token="</s>", mask_token="[MASK]")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=0, bos_token_id=None,
                      pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper distributions: fewer greedy near-ties
        model.lm_head.weight.normal_(0.0, 0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_gpt2(out: Path, seed: int = 0, spare_rows: int = 8) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_bpe(["<|endoftext|>"], eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok) + spare_rows, n_embd=64, n_layer=3, n_head=4,
                     n_positions=512, eos_token_id=0, bos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_neox(out: Path, seed: int = 0) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = build_bpe(["<|endoftext|>", "<|padding|>"], eos_token="<|endoftext|>",
                    pad_token="<|padding|>")
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=len(tok) + 4, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=512,
                        eos_token_id=0, bos_token_id=0, pad_token_id=1, rotary_pct=0.25,
                        tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_full(out: Path) -> Path:
    """A GPT-2 whose tokenizer has no mask token and uses every embedding row."""
    return make_gpt2(out, spare_rows=0)


def write_prompts(path: Path, n: int = len(PROMPT_TEXTS)) -> Path:
    path.write_text("".join(json.dumps({"prompt": PROMPT_TEXTS[i % len(PROMPT_TEXTS)]}) + "\n"
                            for i in range(n)))
    return path
