"""`deer-serve train drafter`: align a DEER drafter to any Hugging Face causal LM.

  deer-serve train drafter --target DIR --prompts FILE.jsonl --out OUT [--arch deer|dflash]
      [--block-size K] [--minutes M | --stage1-steps N --stage2-steps N] [--device cpu|cuda]

1. Teacher data: the target's own continuations of your prompts (one {"prompt": "..."} a
   line), greedy and sampled, a held-out slice for validation (OUT/teacher.pt; finished
   batches are kept in OUT/teacher-parts, so a rerun picks up where it stopped).
2. The drafter is sized from the target (hidden size, heads, vocabulary, the layers it reads)
   and starts from the target's weights where names and shapes match.
3. D2A Stage I + II (`deer_serve.training.d2a.train_drafter`, the preset's trainer). With
   --minutes the run times a few steps, then picks the step counts (Stage I 25 %, Stage II
   75 %) that fit the budget with their evaluations; the teacher data is not counted.
4. OUT/final: the drafter (`deer-serve generate --target DIR --drafter OUT/final`) and its
   model card (README.md). Checkpoints (OUT/ckpt.pt) and OUT/metrics.jsonl as every D2A run;
   a rerun with the same flags resumes.

Bad input (not a causal LM, an empty or malformed prompts file, a budget too small for one
step, a tokenizer that cannot take a mask token) gives a message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

PROG = "deer-serve train drafter"
STAGE1_FRACTION = 0.25     # of a budgeted run's steps (the preset: 300 of 1200)
SAFETY = 0.9               # of the budget left after the measurement, for the steps we plan


class UsageError(Exception):
    """A mistake in the flags or inputs: message on stderr, exit code 2."""


def block_sizes(k: int) -> tuple:
    """The block sizes trained for a largest block k: k and the powers of two down to k/4
    (k = 32 gives the preset's (8, 16, 32))."""
    return tuple(sorted({k} | {b for b in (4, 8, 16, 32, 64) if k // 4 <= b < k}))


def eval_sizes(k: int, gen_len: int) -> tuple:
    return tuple(sorted(b for b in {4, 8, 16, k} if b <= gen_len))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, metavar="DIR", help="a Hugging Face causal LM directory")
    ap.add_argument("--prompts", required=True, metavar="FILE.jsonl", help='one {"prompt": "..."} a line')
    ap.add_argument("--out", required=True, type=Path, metavar="OUT")
    ap.add_argument("--arch", choices=["deer", "dflash"], default="deer",
                    help="deer: a DeerDrafter; dflash: the DFlash format vLLM runs natively")
    ap.add_argument("--block-size", type=int, default=16, metavar="K",
                    help="the largest block trained (also K/2, K/4); default 16")
    ap.add_argument("--minutes", type=float, default=None, metavar="M",
                    help="time budget of D2A (Stage I + II with evaluations; not the teacher "
                         "data); default 30 unless step counts are given")
    ap.add_argument("--stage1-steps", type=int, default=None, metavar="N", help="instead of --minutes")
    ap.add_argument("--stage2-steps", type=int, default=None, metavar="N", help="instead of --minutes")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    t = ap.add_argument_group("teacher data")
    t.add_argument("--prompt-len", type=int, default=64, help="prompts are left-truncated to N tokens")
    t.add_argument("--gen-len", type=int, default=128, help="tokens the target continues")
    t.add_argument("--val-fraction", type=float, default=0.1, help="prompts held out for validation")
    t.add_argument("--sampled-fraction", type=float, default=1 / 3,
                   help="sampled continuations per greedy one")
    t.add_argument("--temperature", type=float, default=0.7, help="of the sampled continuations")
    t.add_argument("--teacher-batch-size", type=int, default=32)
    d = ap.add_argument_group("D2A")
    d.add_argument("--context-mode", choices=["tokens", "target-features"], default="target-features")
    d.add_argument("--num-layers", type=int, default=2, help="drafter layers")
    d.add_argument("--init-layers", choices=["first", "last", "none"], default="last",
                   help="which target layers initialise the drafter's")
    d.add_argument("--lr1", type=float, default=None, help="Stage I peak learning rate")
    d.add_argument("--lr2", type=float, default=None, help="Stage II peak learning rate")
    d.add_argument("--alpha", type=float, default=None, help="Stage II weight base")
    d.add_argument("--batch-size", type=int, default=None, help="teacher sequences per step")
    d.add_argument("--block-tokens", type=int, default=None, help="block tokens per sequence per step")
    d.add_argument("--train-embeddings", action="store_true",
                   help="train the drafter's embeddings (= its tied head) too")
    d.add_argument("--eval-blocks", type=int, default=None, help="validation blocks per k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return ap


def check_args(a) -> None:
    if a.minutes is not None and (a.stage1_steps is not None or a.stage2_steps is not None):
        raise UsageError("give --minutes or --stage1-steps/--stage2-steps, not both")
    if a.minutes is not None and not a.minutes > 0:
        raise UsageError(f"--minutes must be > 0, got {a.minutes}")
    for name in ("stage1_steps", "stage2_steps"):
        v = getattr(a, name)
        if v is not None and v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if a.stage1_steps is not None or a.stage2_steps is not None:
        if (a.stage1_steps or 0) + (a.stage2_steps or 0) < 1:
            raise UsageError("--stage1-steps + --stage2-steps must be at least 1")
    if not 1 <= a.block_size <= 64:
        raise UsageError(f"--block-size must be in [1, 64], got {a.block_size}")
    if a.prompt_len < 1:
        raise UsageError(f"--prompt-len must be >= 1, got {a.prompt_len}")
    if a.gen_len < a.block_size:
        raise UsageError(f"--gen-len ({a.gen_len}) must be at least --block-size ({a.block_size})")
    if not 0 < a.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {a.val_fraction}")
    if not 0 <= a.sampled_fraction <= 1:
        raise UsageError(f"--sampled-fraction must be in [0, 1], got {a.sampled_fraction}")
    if a.sampled_fraction > 0 and not a.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {a.temperature}")
    if a.num_layers < 1 or a.teacher_batch_size < 1 or a.threads < 1:
        raise UsageError("--num-layers, --teacher-batch-size and --threads must be >= 1")
    if a.arch == "dflash" and a.context_mode != "target-features":
        raise UsageError("--arch dflash reads target features (--context-mode target-features)")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device here")


def d2a_config(a):
    from deer_serve.training.d2a import D2AConfig

    cfg = D2AConfig(arch=a.arch, context_mode=a.context_mode, num_layers=a.num_layers,
                    init_layers=a.init_layers, freeze_embeddings=not a.train_embeddings,
                    block_sizes=block_sizes(a.block_size),
                    eval_block_sizes=eval_sizes(a.block_size, a.gen_len),
                    num_threads=a.threads, seed=a.seed, device=a.device)
    for key in ("lr1", "lr2", "alpha", "batch_size", "block_tokens", "eval_blocks"):
        if getattr(a, key) is not None:
            setattr(cfg, key, getattr(a, key))
    if a.stage1_steps is not None or a.stage2_steps is not None:
        cfg.stage1_steps, cfg.stage2_steps = a.stage1_steps or 0, a.stage2_steps or 0
    return cfg


def plan_steps(budget_s: float, measured: dict, ckpt_every: int) -> dict:
    """Stage I / II steps (25 % / 75 %), eval_every and warm-up that fit `budget_s` seconds
    (what is left after the measurement): a second setup, the steps, their checkpoints, the
    evaluations (after Stage I, at the end, and three between when the run is long enough)
    and the final save. Raises UsageError when not even one step fits."""
    step = measured["step_s"] + measured["save_s"] / ckpt_every
    left = SAFETY * budget_s - measured["setup_s"] - 2 * measured["save_s"]
    total, n_eval = 0, 2
    for n_eval, between in ((5, True), (2, False)):
        total = int((left - n_eval * measured["eval_s"]) // step)
        if total >= 20 or not between:
            break
    if total < 1:
        need = (measured["setup_s"] + 2 * measured["save_s"] + 2 * measured["eval_s"]
                + step) / SAFETY
        raise UsageError(f"the budget is too small for one step: after timing the run, "
                         f"{max(0.0, budget_s):.1f} s are left; one D2A step takes "
                         f"{measured['step_s']:.2f} s, an evaluation {measured['eval_s']:.2f} s "
                         f"and loading {measured['setup_s']:.1f} s here; give --minutes "
                         f"{math.ceil((need + measured.get('spent_s', 0)) / 6) / 10:.1f} or more")
    s1 = max(1, round(STAGE1_FRACTION * total)) if total >= 2 else 0
    s2 = total - s1
    return {"stage1_steps": s1, "stage2_steps": s2,
            "eval_every": math.ceil(total / 4) if n_eval == 5 else total + 1,
            "warmup_steps": max(1, min(30, min(s for s in (s1, s2) if s) // 10)),
            "planned_evals": n_eval}


def run(argv) -> dict:
    a = build_parser().parse_args(argv)
    check_args(a)
    from deer_serve.training.d2a import measure_step_seconds, train_drafter
    from deer_serve.training.model_card import write_drafter_card
    from deer_serve.training.target_fit import (TargetError, check_target_dir, load_tokenizer,
                                                resolve_mask_token, target_dims)
    from deer_serve.training.teacher import (PromptsError, PromptTeacherConfig, read_prompts_file,
                                             teacher_from_prompts, tokenize_prompts)

    t_start = time.time()
    # everything cheap first: the target's config and tokenizer, the prompts
    try:
        check_target_dir(a.target)
        from transformers import AutoConfig

        dims = target_dims(AutoConfig.from_pretrained(a.target))
        tok = load_tokenizer(a.target)
        n_tok = len(tok)
        mask_id = resolve_mask_token(tok, dims.vocab_size)
        mask_how = (f"<|mask|> added at row {mask_id}, which the tokenizer does not use"
                    if len(tok) > n_tok else
                    f"the tokenizer's own {tok.convert_ids_to_tokens(mask_id)!r}")
        prompts = read_prompts_file(a.prompts)
        ids = tokenize_prompts(tok, prompts, a.prompt_len)
    except (TargetError, PromptsError) as e:
        raise UsageError(str(e)) from None
    out = a.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: {e.strerror or e}") from None
    print(f"{PROG}: {len(ids)} prompts; target {dims.num_layers} layers, hidden "
          f"{dims.hidden_size}, vocabulary {dims.vocab_size}; mask token id {mask_id} "
          f"({mask_how})", file=sys.stderr)

    tcfg = PromptTeacherConfig(prompt_len=a.prompt_len, gen_len=a.gen_len,
                               sampled_fraction=a.sampled_fraction, temperature=a.temperature,
                               val_fraction=a.val_fraction, batch_size=a.teacher_batch_size,
                               num_threads=a.threads, seed=a.seed, device=a.device)
    teacher_path = out / "teacher.pt"
    teacher = teacher_from_prompts(a.target, ids, teacher_path, tcfg)

    cfg = d2a_config(a)
    feature_cache: dict = {}
    plan_file = out / "plan.json"
    budgeted = a.stage1_steps is None and a.stage2_steps is None
    minutes = (a.minutes if a.minutes is not None else 30.0) if budgeted else None
    key = {"d2a": {k: v for k, v in asdict(cfg).items()
                   if k not in ("stage1_steps", "stage2_steps", "eval_every", "warmup_steps",
                                "num_threads")},
           "teacher": teacher["fingerprint"], "minutes": minutes,
           "steps": None if budgeted else [cfg.stage1_steps, cfg.stage2_steps]}
    key = json.loads(json.dumps(key, default=list))
    prev = json.loads(plan_file.read_text()) if plan_file.exists() else None
    if (out / "ckpt.pt").exists() and (prev is None or prev.get("key") != key):
        raise UsageError(f"{out} holds a D2A checkpoint of another run (other flags, prompts or "
                         f"target): use another --out, or remove {out / 'ckpt.pt'}")
    t_d2a = time.time()
    if budgeted and prev is not None and prev.get("key") == key:
        plan = prev["plan"]                              # a rerun: resume the planned run
        measured = prev["measured"]
        print(f"{PROG}: resuming the planned run ({plan['stage1_steps']} + "
              f"{plan['stage2_steps']} steps)", file=sys.stderr)
    elif minutes is not None:
        measured = measure_step_seconds(replace(cfg, stage1_steps=4, stage2_steps=0),
                                        a.target, teacher_path, feature_cache=feature_cache)
        measured["spent_s"] = round(time.time() - t_d2a, 2)
        plan = plan_steps(minutes * 60 - measured["spent_s"], measured, cfg.ckpt_every)
        print(f"{PROG}: budget {minutes:g} min: a step takes {measured['step_s']:.3f} s, an "
              f"evaluation {measured['eval_s']:.2f} s -> Stage I {plan['stage1_steps']} + "
              f"Stage II {plan['stage2_steps']} steps", file=sys.stderr)
    else:
        measured, plan = None, {"stage1_steps": cfg.stage1_steps, "stage2_steps": cfg.stage2_steps}
    for k, v in plan.items():
        if k != "planned_evals":
            setattr(cfg, k, v)
    plan_file.write_text(json.dumps({"key": key, "plan": plan, "measured": measured,
                                     "minutes": minutes}, indent=1))
    result = train_drafter(cfg, a.target, teacher_path, out, feature_cache=feature_cache)
    d2a_s = time.time() - t_d2a
    write_drafter_card(out / "final", {
        "target": str(Path(a.target).resolve()), "target_dims": asdict(dims),
        "target_model_type": AutoConfig.from_pretrained(a.target).model_type,
        "prompts": str(Path(a.prompts).resolve()), "teacher": teacher, "result": result,
        "mask_token_id": mask_id, "mask_how": mask_how, "minutes": minutes, "plan": plan,
        "measured": measured, "d2a_seconds": round(d2a_s, 1),
        "total_seconds": round(time.time() - t_start, 1), "argv": list(argv)})
    return {"final": str(out / "final"), "tau": {k: v["tau"] for k, v in result["final"].items()
                                                 if isinstance(v, dict) and "tau" in v},
            "steps": {"stage1": cfg.stage1_steps, "stage2": cfg.stage2_steps},
            "d2a_seconds": round(d2a_s, 1), "teacher_rows": len(teacher["ids"]),
            "val_rows": len(teacher["val_ids"])}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        summary = run(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
