"""The `deer-serve` command line (also `python -m deer_serve`).

  deer-serve generate [PROMPT] [--prompts FILE.jsonl] [--mode deer|ar] [--max-new-tokens N]
                      [--temperature T] [--top-p P] [--top-k K] [--block-size K] [--seed S]
                      [--target PATH] [--drafter PATH] [--target-backend torch|vllm] [--json]
  deer-serve serve ...   (deer_serve.serve_cli)
  deer-serve bench ...   (deer_serve.bench.cli)
  deer-serve bench-serve ...   (deer_serve.bench.servers)
  deer-serve train ...   (deer_serve.training.cli)

With no model flags `generate` uses the embedded default (`deer_serve.assets.default_paths`).
With --json it prints one JSON object per prompt, one a line: {"text", "token_ids",
"accept_lengths", "elapsed_s", "finish_reason", "mean_accepted", "cycles"}.
Bad parameters give a message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

# Subcommands owned by other modules: imported only when used, handed the rest of argv.
DELEGATED = {
    "serve": ("deer_serve.serve_cli", "start (or join) Ray and serve HTTP + gRPC", "serve"),
    "bench": ("deer_serve.bench.cli", "benchmark DEER against AR decoding and peers", "bench"),
    "bench-serve": ("deer_serve.bench.servers", "vLLM's and deer-serve's OpenAI servers, one "
                    "client", "bench"),
    "train": ("deer_serve.training.cli", "train the tokenizer, target and drafter", None),
    "load": ("deer_serve.loadtest", "N concurrent streams against a running service", "bench"),
    "export": ("deer_serve.export", "write a drafter in the DFlash format vLLM loads", None),
}
# --target-backend NAME -> (module, class); each class has from_pretrained(path, device=, **kw)
TARGET_BACKENDS = {
    "torch": ("deer_serve.targets.hf", "HFTarget"),
    "vllm": ("deer_serve.targets.vllm_backend", "VLLMTarget"),
}


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported on stderr, exit code 2."""


def main(argv: Optional[Sequence[str]] = None) -> None:
    sys.exit(run(argv))


def run(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on unknown flags
    try:
        return args.func(args)
    except UsageError as e:
        print(f"deer-serve {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="deer-serve", description="DEER speculative decoding: "
                                 "a block-diffusion drafter, an autoregressive verifier.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text for one prompt or a JSONL file of prompts",
                       description="Generate with DEER (or plain AR decoding) in this process.")
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads it from stdin)")
    g.add_argument("--prompts", metavar="FILE.jsonl", help='one {"prompt": "..."} a line')
    g.add_argument("--mode", choices=("deer", "ar"), default="deer",
                   help="deer: draft + verify; ar: plain decoding of the target (default: deer)")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    g.add_argument("--block-size", type=int, default=16, metavar="K",
                   help="draft tokens per cycle, 1..64 (default 16)")
    g.add_argument("--seed", type=int, default=None, metavar="S")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeatable); the text is cut before it")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    g.add_argument("--target", metavar="PATH", help="target checkpoint (default: embedded)")
    g.add_argument("--drafter", metavar="PATH", help="DEER drafter checkpoint (default: embedded)")
    g.add_argument("--target-backend", choices=tuple(TARGET_BACKENDS), default="torch")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    g.add_argument("--adaptive-k", action=argparse.BooleanOptionalAction, default=True,
                   help="per-cycle block size from the request's acceptance (--block-size = max; "
                        "plain AR steps where drafts are not accepted, and a DraftGate over the "
                        "prompts of one run); --no-adaptive-k: a fixed block (default: on)")
    g.add_argument("--lookup", choices=("merge", "off", "only"), default=None,
                   help="prompt lookup in deer mode: merge = spliced into the diffusion block "
                        "after its confident head (the default with the torch backend); off = "
                        "the diffusion block alone (the default with vllm); only = lookup alone")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt, one a line")
    g.set_defaults(func=cmd_generate)

    for name, (_module, help_, _) in DELEGATED.items():
        sub.add_parser(name, help=f"{help_} (see `deer-serve {name} --help`)", add_help=False)
    return ap


# ---- generate ----------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from deer_serve.engine import MAX_BLOCK_SIZE
    from deer_serve.types import SamplingParams

    # Check everything cheap before loading any model.
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                  seed=args.seed, stop=tuple(args.stop),
                                  ignore_eos=args.ignore_eos).validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 1 <= args.block_size <= MAX_BLOCK_SIZE:
        raise UsageError(f"--block-size must be in [1, {MAX_BLOCK_SIZE}], got {args.block_size}")
    prompts = read_prompts(args.prompt, args.prompts)

    if args.target_backend == "vllm":
        # vLLM runs the decode loop itself and verifies DEER drafts with its rejection sampler
        # (deer_serve.targets.vllm_backend); the drafter is loaded inside vLLM's proposer.
        if args.lookup not in (None, "off"):
            raise UsageError("--lookup works with --target-backend torch only")
        target, tokenizer = load_vllm_target(args)
        gen = lambda ids: target.generate(ids, sampling, mode=args.mode,  # noqa: E731
                                          block_size=args.block_size, detokenize=detok)
    else:
        target, drafter, tokenizer = load_models(args)
        from deer_serve.adaptive import DraftGate, gate_for
        from deer_serve.engine import generate

        gate = DraftGate() if args.adaptive_k else None  # learns over this run's prompts
        gen = lambda ids: generate(target, drafter, ids, sampling, mode=args.mode,  # noqa: E731
                                   block_size=args.block_size, detokenize=detok,
                                   adaptive_k=args.adaptive_k, gate=gate_for(gate, args.seed))

    def detok(ids: list[int]) -> str:  # a def: its type is known where `gen` above refers to it
        return tokenizer.decode(ids, skip_special_tokens=True)

    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise UsageError("a prompt is empty after tokenization")
        try:
            r = gen(ids)
        except ValueError as e:  # the engine's parameter checks
            raise UsageError(str(e)) from None
        if args.json:
            print(json.dumps({"text": r.text, "token_ids": r.token_ids,
                              "accept_lengths": r.accept_lengths, "elapsed_s": r.elapsed_s,
                              "finish_reason": r.finish_reason,
                              "mean_accepted": r.mean_accepted, "cycles": r.cycles}), flush=True)
        else:
            print(r.text, flush=True)
            n = len(r.token_ids)
            rate = n / r.elapsed_s if r.elapsed_s > 0 else 0.0
            tau = f", mean accepted {r.mean_accepted:.2f}" if args.mode == "deer" else ""
            print(f"[{args.mode}] {n} tokens in {r.elapsed_s:.2f} s ({rate:.1f} tok/s), "
                  f"{r.cycles} cycles{tau}, finish: {r.finish_reason}", file=sys.stderr)
    return 0


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> list[str]:
    out = []
    if prompt is not None:
        out.append(sys.stdin.read() if prompt == "-" else prompt)
    if prompts_file is not None:
        from deer_serve.prompts import PromptsError, read_prompt_lines

        try:
            out += [p for _, p in read_prompt_lines(prompts_file)]
        except PromptsError as e:
            raise UsageError(str(e)) from None
    if not out:
        raise UsageError("give a PROMPT or --prompts FILE.jsonl")
    if any(p == "" for p in out):
        raise UsageError("prompts must not be empty")
    return out


def load_models(args: argparse.Namespace):
    """(target, drafter or None, tokenizer) from the flags or the embedded default."""
    from deer_serve.assets import default_paths, is_checkpoint

    default_target, default_drafter = default_paths()
    target_dir = Path(args.target) if args.target else default_target
    drafter_dir = Path(args.drafter) if args.drafter else default_drafter
    needed = [("target", target_dir, args.target)]
    use_drafter = args.mode == "deer" and getattr(args, "lookup", None) != "only"
    if use_drafter:
        needed.append(("drafter", drafter_dir, args.drafter))
    for what, path, given in needed:
        if not is_checkpoint(path):
            if given:
                raise UsageError(f"--{what} {path}: no checkpoint there (no config.json)")
            raise UsageError(f"the embedded default {what} is missing ({path}); build it with "
                             f"`make train-default` and export it to deer_serve/assets, "
                             f"or pass --{what} PATH")

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    except (OSError, ValueError) as e:
        raise UsageError(f"no tokenizer in {target_dir}: {e}") from None

    drafter = None
    if use_drafter:
        from deer_serve.drafters import DrafterFormatError, load_drafter

        try:
            drafter = load_drafter(drafter_dir, target_dir, device=args.device)
        except DrafterFormatError as e:
            raise UsageError(f"--drafter {drafter_dir}: {e}") from None
    kw = {}
    if drafter is not None and drafter.context_mode == "target-features":
        kw["feature_layers"] = drafter.feature_layers  # the layers the drafter was trained on
    target = load_target(args.target_backend, target_dir, args.device, **kw)
    if drafter is not None:
        if drafter.vocab_size != target.vocab_size:
            raise UsageError(f"drafter vocabulary ({drafter.vocab_size}) differs from the "
                             f"target's ({target.vocab_size})")
        want = getattr(drafter.model.config, "target_feature_dim", 0)
        if drafter.context_mode == "target-features" and want != target.feature_dim:
            raise UsageError(f"the drafter reads {want} target features, the target gives "
                             f"{target.feature_dim}")
    lookup = getattr(args, "lookup", None) or "merge"
    if args.mode == "deer" and lookup != "off":
        from deer_serve.drafters.lookup import LookupDrafter

        drafter = LookupDrafter(drafter if lookup == "merge" else None, vocab_size=target.vocab_size)
    return target, drafter, tokenizer


def load_vllm_target(args: argparse.Namespace):
    """(VLLMTarget, tokenizer) for `--target-backend vllm`: the checks of `load_models`, the
    models themselves start inside vLLM (the drafter in its DEER proposer)."""
    import json

    from deer_serve.assets import default_paths, is_checkpoint

    default_target, default_drafter = default_paths()
    target_dir = Path(args.target) if args.target else default_target
    drafter_dir = Path(args.drafter) if args.drafter else default_drafter
    needed = [("target", target_dir, args.target)]
    if args.mode == "deer":
        needed.append(("drafter", drafter_dir, args.drafter))
    for what, path, given in needed:
        if not is_checkpoint(path):
            raise UsageError(f"--{what} {path}: no checkpoint there (no config.json)" if given
                             else f"the embedded default {what} is missing ({path})")
    if args.mode == "deer":
        t = json.loads((target_dir / "config.json").read_text())
        d = json.loads((drafter_dir / "config.json").read_text())
        tv = t.get("vocab_size", (t.get("text_config") or {}).get("vocab_size"))
        if d.get("vocab_size") != tv:
            raise UsageError(f"drafter vocabulary ({d.get('vocab_size')}) differs from the "
                             f"target's ({tv})")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    except (OSError, ValueError) as e:
        raise UsageError(f"no tokenizer in {target_dir}: {e}") from None
    drafter = str(drafter_dir) if args.mode == "deer" else None
    return load_target("vllm", target_dir, args.device, drafter_path=drafter), tokenizer


def load_target(backend: str, path: Path, device: Optional[str], **kw):
    module, cls = TARGET_BACKENDS[backend]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        extra = " (install vLLM: make install, or python -m deer_serve.targets.install_vllm)" \
            if backend == "vllm" else ""
        raise UsageError(f"--target-backend {backend} is not available: {e}{extra}") from None
    return getattr(mod, cls).from_pretrained(str(path), device=device, **kw)


# ---- delegated subcommands ---------------------------------------------------------------

def _delegate(command: str, rest: list[str]) -> int:
    module, _, extra = DELEGATED[command]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        hint = f" (pip install 'deer-serve[{extra}]')" if extra else ""
        print(f"deer-serve {command}: not available: {e}{hint}", file=sys.stderr)
        return 2
    rc = mod.main(rest)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    main()
