"""`deer-serve bench`: every method on the same target, prompts and machine, in one run.

    deer-serve bench --suite humaneval --limit 20 --methods ar,deer,hf-assisted,pld \
        --temperature 0 --out bench-out/he20
    deer-serve bench --quick --out bench-out/quick          # under 5 minutes on 2 CPU cores

Interleaving: for each temperature, for each prompt, for each repeat, every method runs once in
turn (the order rotates by one each time, so no method always runs first), so drift of a shared
machine hits all methods alike. Each method gets one untimed warm-up call first.

Block sizes: `deer` runs once per `--block-size` entry; the FIRST is the main one, reported as
`methods.deer`, the others as `methods["deer@k8"]` etc. (each entry carries its `block_size`).
`deer` decodes as `deer-serve generate` does by default (adaptive k up to the block size, a
`DraftGate` per method, the DEER drafter's block with prompt lookup spliced in);
`deer-fixed` (a fixed block), `deer-nolookup` (no lookup) and the service methods use the first
block size. `sd-ar` (the AR draft model as the engine's drafter, no lookup, adaptive k and a gate
as deer has them) runs once per block size as `deer` does (`sd-ar`, `sd-ar@k8`, ...);
`sd-ar-fixed` uses the first.

results.json: `machine`, `command`, `suite`, `n_prompts`, `settings`, `methods` (the first
temperature's), `runs` ([{temperature, methods}] for every temperature), `warnings`, `total_s`,
`complete` (false while later temperatures are still running: all outputs are rewritten after
each temperature, so a run cut short keeps what it measured).
samples.jsonl: one line per (temperature, method, prompt, repeat) with its raw numbers.
For service methods `methods.deer-ray*` add `throughput_by_concurrency` ({"1": tok/s, ...}) and
`pipeline_hit_rate` (null when the service reports no pipeline counters).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

from deer_serve.bench.methods import ALL_METHODS, AR_DRAFT_METHODS, PLD_TOKENS, SERVICE_METHODS
from deer_serve.bench.runner import (assistant_schedule, build_methods, machine_info,
                                     run_temperature)

QUICK: dict[str, Any] = {"suite": "humaneval", "limit": 6, "methods": "ar,deer,hf-assisted,pld",
                         "temperature": "0", "block_size": "16,8", "max_new_tokens": 64,
                         "repeats": 1, "concurrency": "1,4"}
DEFAULTS: dict[str, Any] = {"suite": "humaneval", "limit": None,
                            "methods": "ar,deer,hf-assisted,pld", "temperature": "0",
                            "block_size": "16,4,8,32", "max_new_tokens": 128, "repeats": 3,
                            "concurrency": "1,4,8,16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deer-serve bench",
        description="Benchmark DEER against plain decoding and its peers (one interleaved run); "
                    "writes results.json, report.md and PNG plots under --out.")
    p.add_argument("--suite", help="humaneval | stdlib-val | FILE.jsonl of {\"prompt\"} "
                                   f"(default {DEFAULTS['suite']})")
    p.add_argument("--limit", type=int, help="first N prompts of the suite (default: all)")
    p.add_argument("--methods", help=f"comma list of {','.join(ALL_METHODS)} "
                                     f"(default {DEFAULTS['methods']})")
    p.add_argument("--temperature", help="comma list, e.g. 0,0.6 (default 0)")
    p.add_argument("--block-size", help="comma list, the deer sweep; the first is the main one "
                                        f"(default {DEFAULTS['block_size']})")
    p.add_argument("--max-new-tokens", type=int, help=f"(default {DEFAULTS['max_new_tokens']})")
    p.add_argument("--concurrency", help="comma list, for service methods (default "
                                         f"{DEFAULTS['concurrency']})")
    p.add_argument("--repeats", type=int, help=f"(default {DEFAULTS['repeats']}); medians reported")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--target", help="target model dir (default: embedded)")
    p.add_argument("--drafter", help="drafter dir, DeerDrafter or DFlash (default: embedded)")
    p.add_argument("--alt-drafter", help="a second drafter for deer-alt / deer-alt-nolookup "
                                         "(either format), to compare two drafters in one run")
    p.add_argument("--ar-draft", help="AR draft model dir for hf-assisted and sd-ar (default: "
                                      "embedded)")
    p.add_argument("--url", help="a running deer-serve (http://HOST:PORT) for service methods; "
                                 "default: start one in this process")
    p.add_argument("--seed", type=int, default=0, help="base seed of sampled runs (default 0)")
    p.add_argument("--service-args", type=json.loads, default=None, metavar="JSON",
                   help='AppConfig fields for the service the bench starts, e.g. \'{"batching": false}\'')
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: leave torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="preset: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()
                                              if k != "concurrency") + " (flags given win)")
    return p


class UsageError(ValueError):
    """A mistake in the command line: one line on stderr, exit code 2."""


def _list(s: str, cast, flag: str) -> list:
    try:
        vals = [cast(x) for x in str(s).split(",") if x.strip() != ""]
    except ValueError:
        raise UsageError(f"{flag} takes a comma list, got {s!r}") from None
    if not vals:
        raise UsageError(f"{flag} is empty")
    return vals


def resolve(args: argparse.Namespace) -> dict:
    """Flags + preset + defaults -> the run's settings (validated)."""
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    get = lambda k: getattr(args, k) if getattr(args, k) is not None else base[k]  # noqa: E731
    methods = _list(get("methods"), str, "--methods")
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise UsageError(f"unknown method(s) {bad}; choose from {','.join(ALL_METHODS)}")
    methods = list(dict.fromkeys(methods))
    temps = _list(get("temperature"), float, "--temperature")
    ks = list(dict.fromkeys(_list(get("block_size"), int, "--block-size")))
    conc = list(dict.fromkeys(_list(get("concurrency"), int, "--concurrency")))
    for name, vals, lo in (("--temperature", temps, 0), ("--block-size", ks, 1),
                           ("--concurrency", conc, 1)):
        if any(v < lo for v in vals):
            raise UsageError(f"{name} values must be >= {lo}")
    if any(k > 64 for k in ks):
        raise UsageError("--block-size values must be <= 64")
    n, reps = get("max_new_tokens"), get("repeats")
    if n < 1 or reps < 1:
        raise UsageError("--max-new-tokens and --repeats must be >= 1")
    paths = default_paths()
    return {"suite": get("suite"), "limit": get("limit"), "methods": methods,
            "temperatures": temps, "block_sizes": ks, "max_new_tokens": n, "repeats": reps,
            "concurrency": conc, "seed": args.seed, "quick": args.quick,
            "target": str(args.target or paths["target"]),
            "drafter": str(args.drafter or paths["drafter"]),
            "ar_draft": str(args.ar_draft or paths["ar-draft"]), "url": args.url,
            "alt_drafter": str(args.alt_drafter) if args.alt_drafter else None,
            "threads": args.threads or None, "service_args": args.service_args}


def default_paths() -> dict:
    """The embedded assets: deer_serve.assets.default_paths() when it exists, else the dirs."""
    root = Path(__file__).resolve().parents[1] / "assets"
    paths = {"target": root / "target", "drafter": root / "drafter", "ar-draft": root / "ar-draft"}
    try:
        from deer_serve.assets import default_paths as dp

        got = dp()
        if isinstance(got, dict):
            for k in list(paths):
                for alias in (k, k.replace("-", "_")):
                    if got.get(alias):
                        paths[k] = Path(got[alias])
        elif isinstance(got, (tuple, list)):
            paths.update(zip(("target", "drafter", "ar-draft"), map(Path, got)))
        else:
            for k in list(paths):
                v = getattr(got, k.replace("-", "_"), None)
                if v:
                    paths[k] = Path(v)
    except ImportError:
        pass
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)  # argparse exits 2 on unknown flags
    import signal
    import threading

    def interrupt(*_):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # SIGTERM (timeout, kill): clean up
        signal.signal(signal.SIGTERM, interrupt)
    try:
        return bench(args, argv)
    except (UsageError, FileNotFoundError) as e:
        print(f"deer-serve bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndeer-serve bench: interrupted; {args.out} holds the temperatures finished so far",
              file=sys.stderr)
        return 130


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    s = resolve(args)
    t_start = time.perf_counter()
    import torch

    from deer_serve.bench import report
    from deer_serve.bench.methods import Models
    from deer_serve.bench.service import LocalService, ServiceClient, ServiceError
    from deer_serve.bench.suites import load_suite

    if s["threads"]:
        torch.set_num_threads(s["threads"])
    try:
        prompts = load_suite(s["suite"], s["limit"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    for k in ("target", "drafter", "ar_draft"):
        needed = {"drafter": any(m.startswith("deer") for m in s["methods"]),
                  "ar_draft": any(m in AR_DRAFT_METHODS for m in s["methods"]),
                  "target": True}[k]
        if needed and not Path(s[k]).is_dir():
            raise UsageError(f"{k.replace('_', '-')} model not found at {s[k]} "
                             f"(pass --{k.replace('_', '-')} PATH)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = Models(s["target"], s["drafter"], s["ar_draft"], s["alt_drafter"])
    max_pos = int(getattr(models.model.config, "max_position_embeddings", 1 << 30))
    keep = max(1, max_pos - s["max_new_tokens"] - 64)  # room for the output and a last block
    prompt_ids, truncated = [], 0
    for p in prompts:
        ids = models.encode(p.text)
        if len(ids) > keep:
            ids, truncated = ids[-keep:], truncated + 1
        prompt_ids.append(ids)
    names = [p.id for p in prompts]
    warnings: list[str] = []
    if truncated:
        warnings.append(f"{truncated} prompt(s) cut to their last {keep} tokens to fit the target")

    service_ctx, client, service_error = None, None, None
    if any(m in SERVICE_METHODS for m in s["methods"]):
        try:
            if s["url"]:
                client = ServiceClient(s["url"])
                if not client.healthy():
                    raise ServiceError(f"no healthy deer-serve at {s['url']} (GET /healthz)")
            else:
                service_ctx = LocalService(s["target"], s["drafter"], s["block_sizes"][0],
                                           extra_args=s.get("service_args")).__enter__()
                client = ServiceClient(service_ctx.url)
        except Exception as e:  # the other methods still run; the service ones report this
            service_error = f"{type(e).__name__}: {e}"
            print(f"WARNING: service methods unavailable: {service_error}", file=sys.stderr)

    machine = machine_info()
    settings = {k: s[k] for k in ("suite", "limit", "methods", "temperatures", "block_sizes",
                                  "max_new_tokens", "repeats", "concurrency", "seed", "quick",
                                  "target", "drafter", "ar_draft", "alt_drafter", "url", "threads",
                                  "service_args")}
    settings.update(eos_token_id=models.eos_token_id, interleaved=True, warmup=True,
                    prompt_tokens_mean=round(sum(map(len, prompt_ids)) / len(prompt_ids), 1),
                    main_block_size=s["block_sizes"][0],
                    service_url=s["url"] or (service_ctx.url if service_ctx else None))
    try:
        methods = build_methods(s, models, client, service_error)
        runs: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        settings["pld_num_tokens"] = PLD_TOKENS

        def write(complete: bool) -> dict:
            """results.json, samples.jsonl, report.md and plots of the temperatures done so far
            (after each one, so a run cut short keeps what it measured)."""
            machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
            if "hf-assisted" in s["methods"] and models._ar_draft is not None:
                settings["hf_assisted"] = assistant_schedule(models.ar_draft)
            results = {"machine": machine, "command": "deer-serve bench " + shlex.join(argv),
                       "suite": s["suite"], "n_prompts": len(prompts), "settings": settings,
                       "methods": runs[0]["methods"], "runs": runs, "warnings": warnings,
                       "complete": complete, "total_s": round(time.perf_counter() - t_start, 1)}
            (out_dir / "results.json").write_text(json.dumps(results, indent=1))
            with open(out_dir / "samples.jsonl", "w") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in samples)
            report.write_report(results, out_dir)
            return results

        for j, T in enumerate(s["temperatures"]):
            res = run_temperature(T, s, methods, prompt_ids, names, warnings, samples)
            runs.append({"temperature": T, "methods": res})
            results = write(complete=j == len(s["temperatures"]) - 1)
    finally:
        if service_ctx is not None:
            service_ctx.__exit__(None, None, None)

    total = results["total_s"]
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    print(report.summary_table(results))
    print(f"wrote {out_dir}/results.json, report.md and plots; total {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
