"""Byte-level BPE tokenizer for the embedded default models, trained on the corpus train split.

Special tokens: `<|endoftext|>` = id 0 (eos and pad), `<|mask|>` = id 1 (the drafter's mask).
Saved as a Hugging Face fast tokenizer, so `AutoTokenizer.from_pretrained(out_dir)` loads it.
Decoding round-trips source text exactly (ByteLevel, no prefix space, no clean-up of spaces).

CLI: python -m deer_serve.training.tokenizer --out runs/tiny-code/tokenizer [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from deer_serve.training import corpus

EOT = "<|endoftext|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = [EOT, MASK]  # ids 0 and 1, in this order
EOT_ID = 0
MASK_ID = 1


def _iter_texts(files: Sequence[Path]):
    for p in files:
        yield corpus.read_text(p)


def build_hf_tokenizer(raw):
    """Wrap a `tokenizers.Tokenizer` as a `PreTrainedTokenizerFast` with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOT,
        pad_token=EOT,
        mask_token=MASK,
        clean_up_tokenization_spaces=False,  # keep " ." etc. exactly
        model_max_length=2048,
    )


def train_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 4096,
    files: Sequence[Path] | None = None,
    show_progress: bool = True,
):
    """Train a byte-level BPE on `files` (default: the corpus train split) and save it to `out_dir`.

    Returns the `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if files is None:
        files = corpus.list_files("train")
    files = list(files)

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    raw.train_from_iterator(_iter_texts(files), trainer=trainer, length=len(files))
    assert raw.token_to_id(EOT) == EOT_ID and raw.token_to_id(MASK) == MASK_ID

    tok = build_hf_tokenizer(raw)
    tok.save_pretrained(str(out_dir))
    return tok


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer on the stdlib corpus.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args(argv)
    t0 = time.time()
    files = corpus.list_files("train")
    tok = train_tokenizer(args.out, vocab_size=args.vocab_size, files=files)
    print(
        f"tokenizer: {len(tok)} tokens, trained on {len(files)} files in {time.time() - t0:.1f}s; "
        f"{EOT}={tok.convert_tokens_to_ids(EOT)} {MASK}={tok.convert_tokens_to_ids(MASK)}; saved to {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
