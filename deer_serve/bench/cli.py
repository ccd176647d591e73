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
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from deer_serve.bench.methods import (ALL_METHODS, AR_DRAFT_METHODS, PLD_TOKENS, SERVICE_METHODS,
                                      VLLM_METHODS, Sample)

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


def machine_info() -> dict:
    import importlib.metadata as md

    import torch

    from deer_serve.bench.stats import cpu_name

    cpu = cpu_name()

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": ver("transformers"), "ray": ver("ray"),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def build_methods(s: dict, models, client, service_error: Optional[str] = None) -> list:
    from deer_serve.bench.methods import EngineMethod, HFGenerateMethod
    from deer_serve.bench.service import ServiceMethod, UnavailableMethod

    out: list[Any] = []   # EngineMethod, HFGenerateMethod, VLLMMethod, ServiceMethod, UnavailableMethod
    k0 = s["block_sizes"][0]
    for name in s["methods"]:
        if name == "ar":
            out.append(EngineMethod("ar", models, "ar"))
        elif name == "deer":  # as deer-serve decodes by default: adaptive k, the gate, lookup
            for k in s["block_sizes"]:
                out.append(EngineMethod("deer" if k == k0 else f"deer@k{k}", models, "deer", k,
                                        lookup=True, adaptive_k=True))
        elif name == "deer-adaptive":
            out.append(EngineMethod("deer-adaptive", models, "deer", k0, lookup=True,
                                    adaptive_k=True))
        elif name == "deer-fixed":
            out.append(EngineMethod("deer-fixed", models, "deer", k0, lookup=True))
        elif name == "deer-alt":
            for k in s["block_sizes"]:
                out.append(EngineMethod("deer-alt" if k == k0 else f"deer-alt@k{k}", models,
                                        "deer", k, lookup=True, adaptive_k=True, alt=True))
        elif name == "deer-alt-nolookup":
            out.append(EngineMethod("deer-alt-nolookup", models, "deer", k0, adaptive_k=True,
                                    alt=True))
        elif name == "deer-nolookup":
            out.append(EngineMethod("deer-nolookup", models, "deer", k0, adaptive_k=True))
        elif name == "sd-ar":
            for k in s["block_sizes"]:
                out.append(EngineMethod("sd-ar" if k == k0 else f"sd-ar@k{k}", models, "deer", k,
                                        adaptive_k=True, ar_draft=True))
        elif name == "sd-ar-fixed":
            out.append(EngineMethod("sd-ar-fixed", models, "deer", k0, ar_draft=True))
        elif name == "deer-pipe":
            out.append(EngineMethod("deer-pipe", models, "deer", k0, lookup=True, pipeline=True))
        elif name in SERVICE_METHODS:
            out.append(ServiceMethod(name, client, k0, models.eos_token_id) if client is not None
                       else UnavailableMethod(name, service_error or "no service"))
        elif name in VLLM_METHODS:
            from deer_serve.bench.methods import VLLMMethod

            try:  # vLLM missing or failing to start: report it, run the other methods
                out.append(VLLMMethod(name, models, k0))
            except Exception as e:  # noqa: BLE001
                out.append(UnavailableMethod(name, f"vLLM: {type(e).__name__}: {e}"))
        else:
            out.append(HFGenerateMethod(name, models))
    return out


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


def assistant_schedule(assistant) -> dict:
    """HF assisted generation's draft schedule: the assistant's own settings, else HF's defaults."""
    from transformers import GenerationConfig

    g = assistant.generation_config
    dflt = GenerationConfig._get_default_generation_params() \
        if hasattr(GenerationConfig, "_get_default_generation_params") else {}
    return {k: getattr(g, k, None) if getattr(g, k, None) is not None else dflt.get(k)
            for k in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                      "assistant_confidence_threshold")}


def run_temperature(T: float, s: dict, methods: list, prompt_ids: list, names: list,
                    warnings: list, sink: Optional[list] = None) -> dict:
    """Every method on every prompt and repeat at temperature T, interleaved -> methods dict."""
    from tqdm import tqdm

    from deer_serve.bench import stats
    from deer_serve.types import SamplingParams

    n, reps = len(prompt_ids), s["repeats"]
    grids: dict[str, list[list[Optional[Sample]]]] = {
        m.name: [[None] * reps for _ in range(n)] for m in methods}
    errors: dict[str, str] = {}
    sp = lambda i, r: SamplingParams(temperature=T, max_new_tokens=s["max_new_tokens"],  # noqa: E731
                                     seed=s["seed"] + 1000 * i + r)
    warm = SamplingParams(temperature=T, max_new_tokens=min(8, s["max_new_tokens"]), seed=s["seed"])
    for m in methods:  # untimed warm-up: first-call costs (allocations, lazy imports) stay out
        try:
            m.run(prompt_ids[0], warm)
        except Exception as e:
            errors[m.name] = f"{type(e).__name__}: {e}"
    live = [m for m in methods if m.name not in errors]
    bar = tqdm(total=n * reps, desc=f"bench T={T:g}", unit="prompt", dynamic_ncols=True)
    step = 0
    for i, ids in enumerate(prompt_ids):
        for r in range(reps):
            rot = step % len(live) if live else 0
            for m in live[rot:] + live[:rot]:
                if m.name in errors:
                    continue
                try:
                    grids[m.name][i][r] = m.run(ids, sp(i, r))
                except Exception as e:  # one broken method must not sink the run
                    errors[m.name] = f"{type(e).__name__}: {e} (prompt {names[i]})"
            step += 1
            bar.update(1)
    bar.close()

    if sink is not None:  # raw samples, for re-analysis (samples.jsonl)
        for name, grid in grids.items():
            for i, per_repeat in enumerate(grid):
                for r, x in enumerate(per_repeat):
                    if x is not None:
                        sink.append(sample_record(T, name, names[i], r, x))
    ar = grids.get("ar") if "ar" not in errors else None
    out = {}
    for m in methods:
        if m.name in errors:
            out[m.name] = {"block_size": m.block_size, "error": errors[m.name]}
            warnings.append(f"T={T:g} {m.name} failed: {errors[m.name]}")
            continue
        row = stats.summarize(grids[m.name], block_size=m.block_size)
        if getattr(m, "adaptive_k", False):
            row["adaptive_k"] = True
        gate = getattr(m, "gate", None)
        if gate is not None:  # cumulative over the run: requests started with drafting off
            row["gate"] = {"gated": gate.gated, "probes": gate.probes, "state": {
                str(t): v for t, v in gate.state().items()}}
        if T == 0:
            row.update(stats.identity(grids[m.name], ar, names))
        else:
            row["identical_to_ar"] = None  # sampled: checked statistically by the tests instead
        out[m.name] = row
    stats.add_speedups(out)
    for m in methods:
        if m.name in SERVICE_METHODS and m.name not in errors:
            try:
                out[m.name].update(service_throughput(m, s, prompt_ids, sp, ar if T == 0 else None))
            except Exception as e:
                out[m.name]["throughput_error"] = f"{type(e).__name__}: {e}"
                warnings.append(f"T={T:g} {m.name} concurrency phase failed: {e}")
            # single-stream rate from the samples (summarize); null: the service sent no counters
            out[m.name].setdefault("pipeline_hit_rate", None)
    if "deer-ray-nopipe" in out and "error" not in out["deer-ray-nopipe"] \
            and out.get("deer-ray", {}).get("pipeline_hit_rate") is None:
        warnings.append(f"T={T:g}: the service reports no pipeline counters (deer.pipeline_hits/"
                        "pipeline_misses), so it does not pipeline or ignores `pipeline`: "
                        "deer-ray and deer-ray-nopipe ran the same code")
    for name, row in out.items():
        if row.get("identical_to_ar") is False:
            msg = (f"T=0 {name} is NOT identical to ar on {row['n_mismatched']} sample(s), "
                   f"e.g. {row['mismatches'][0]}")
            warnings.append(msg)
            print("\n" + "!" * 78 + f"\n!!! {msg}\n" + "!" * 78, file=sys.stderr)
    return out


def sample_record(T: float, method: str, prompt: str, repeat: int, x) -> dict:
    import hashlib

    return {"temperature": T, "method": method, "prompt": prompt, "repeat": repeat,
            "new_tokens": len(x.token_ids), "wall_s": round(x.wall_s, 6),
            "ids_sha1": hashlib.sha1(json.dumps(x.token_ids).encode()).hexdigest()[:16],
            "accept_lengths": x.accept_lengths, "cycles": x.cycles,
            "timings": {k: round(v, 6) for k, v in x.timings.items()}, **x.extra}


def service_throughput(m, s, prompt_ids, sp, ar_grid) -> dict:
    """Throughput at each concurrency: max(n_prompts, c) requests (prompts cycled), c at a time."""
    from deer_serve.bench import stats

    by_c, hits, misses, bad = {}, 0, 0, 0
    for c in s["concurrency"]:
        jobs = [(i % len(prompt_ids)) for i in range(max(len(prompt_ids), c))]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            samples = list(pool.map(lambda i: m.run(prompt_ids[i], sp(i, 0)), jobs))
        wall = time.perf_counter() - t0
        by_c[str(c)] = round(sum(len(x.token_ids) for x in samples) / wall, 3)
        hits += sum(int(x.extra.get("pipeline_hits", 0)) for x in samples)
        misses += sum(int(x.extra.get("pipeline_misses", 0)) for x in samples)
        if ar_grid is not None:
            bad += sum(stats.first_diff(x.token_ids, ar_grid[i][0].token_ids) is not None
                       for x, i in zip(samples, jobs))
    out: dict[str, Any] = {"throughput_by_concurrency": by_c}
    if ar_grid is not None:
        out["concurrent_identical_to_ar"] = bad == 0
    if hits + misses:
        out["concurrent_pipeline_hit_rate"] = round(hits / (hits + misses), 4)
    return out


if __name__ == "__main__":
    sys.exit(main())
