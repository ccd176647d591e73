"""`deer-serve train`: the whole pipeline of the embedded default, or any one stage.

  deer-serve train --preset tiny-code --out runs/tiny-code            # everything (67 min measured, 2 cores)
  deer-serve train --preset smoke --out /tmp/smoke                    # end to end in < 2 min
  deer-serve train --preset tiny-code --out runs/tiny-code --stages drafter --context-mode tokens
  deer-serve train ... --export deer_serve/assets                     # ship the final weights
  deer-serve train --stages drafter --drafter-name drafter-v2 --init-from deer_serve/assets/drafter \
      --stage1-steps 0 --stage2-steps 900 --lr2 4e-4                # continue D2A from a drafter
  deer-serve train drafter --target DIR --prompts FILE.jsonl --out OUT   # any HF causal LM
                                                                    # (deer_serve.training.drafter_cli)

Stages, in order (each resumes or is skipped when its output exists):
  tokenizer -> target -> teacher -> drafter (D2A Stage I + II, then the preset's Stage II
  continuation phases drafter-v2.. unless --no-continuation or a D2A flag) -> ar-draft
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

STAGES = ("tokenizer", "target", "teacher", "drafter", "ar-draft")


def _configs(preset: str):
    from deer_serve.training.ar_draft import ARDraftConfig
    from deer_serve.training.d2a import D2AConfig
    from deer_serve.training.teacher import TeacherConfig
    from deer_serve.training.train_target import TargetTrainConfig

    if preset == "smoke":
        return dict(vocab=512, limit_files=30, target=TargetTrainConfig.smoke(),
                    teacher=TeacherConfig.smoke(), d2a=D2AConfig.smoke(), ar=ARDraftConfig.smoke(),
                    continuation=[Phase("v2", 3, 4e-4, from_export=True, docstring_rows=4),
                                  Phase("v3", 2, 3e-4)])
    if preset == "tiny-code":
        # the shipped drafter (its model card): a base D2A run on the corpus continuations, then
        # Stage II continuations on those plus the docstring-prompt set, the first from the
        # base's float16 export (the weights that were shipped then), each from the last
        return dict(vocab=4096, limit_files=None, target=TargetTrainConfig(), teacher=TeacherConfig(),
                    d2a=D2AConfig(stage1_steps=300, stage2_steps=900), base={"use_docstring_data": False},
                    ar=ARDraftConfig(),
                    continuation=[Phase("v2", 900, 4e-4, from_export=True, docstring_rows=1536),
                                  Phase("v3", 900, 3e-4, docstring_rows=1536),
                                  Phase("v4", 900, 3e-4, docstring_rows=1536),
                                  Phase("v5", 900, 3e-4)])
    raise SystemExit(f"unknown preset {preset!r} (smoke, tiny-code)")


@dataclass(frozen=True)
class Phase:
    """One Stage II continuation of the preset's drafter: `deer-serve train --stages drafter
    --init-from PREVIOUS --stage1-steps 0 --stage2-steps STEPS --lr2 LR2 --drafter-name
    drafter-NAME [--docstring-rows N]` (docstring data on), PREVIOUS being the last phase's final
    weights, or their float16 export with from_export."""
    name: str
    stage2_steps: int
    lr2: float
    from_export: bool = False
    docstring_rows: int | None = None  # the first N docstring continuations (None = all)


def run(preset: str, out: Path, stages=STAGES, context_mode: str | None = None,
        drafter_name: str = "drafter", overrides: dict | None = None,
        ar_steps: int | None = None, continuation: bool | None = None) -> dict:
    """The preset's stages into `out`. continuation (default: when the drafter's recipe is the
    preset's own: no context mode or D2A overrides) runs the preset's Stage II continuation
    phases after the base drafter; results["drafter_final"] names the drafter run to export.
    Each stage's wall time goes to results["timing"] and, one line per invocation, to
    out/timing.jsonl (a stage that finds its output already there counts as its check)."""
    from deer_serve.training import corpus
    from deer_serve.training.ar_draft import train_ar_draft
    from deer_serve.training.d2a import train_drafter
    from deer_serve.training.teacher import generate_teacher
    from deer_serve.training.tokenizer import train_tokenizer
    from deer_serve.training.train_target import train_target

    c = _configs(preset)
    if context_mode:
        c["d2a"].context_mode = context_mode
    for key, val in (overrides or {}).items():
        setattr(c["d2a"], key, val)
    if ar_steps:
        c["ar"].steps = ar_steps
    out.mkdir(parents=True, exist_ok=True)
    tok_dir, target_dir = out / "tokenizer", out / "target" / "final"
    results: dict[str, Any] = {}
    clock = StageClock()
    if "tokenizer" in stages and not (tok_dir / "tokenizer.json").exists():
        with clock("tokenizer"):
            files = corpus.list_files("train")
            train_tokenizer(tok_dir, vocab_size=c["vocab"],
                            files=files[:c["limit_files"]] if c["limit_files"] else None)
    if "target" in stages and not (target_dir / "metrics.json").exists():
        with clock("target"):
            c["target"].train_limit_files = c["limit_files"]
            results["target"] = train_target(c["target"], tok_dir, out / "target")
    teacher_path = out / "teacher.pt"
    if "teacher" in stages:
        with clock("teacher"):
            generate_teacher(target_dir, teacher_path, c["teacher"], out / "target" / "data_cache",
                             limit_files=c["limit_files"])
    if "drafter" in stages:
        corpus_ids = None
        if c["d2a"].stage0_steps:  # Stage 0 reads the tokenized train split (cached by the target)
            corpus_ids = corpus.tokenize_split("train", tok_dir, out / "target" / "data_cache",
                                               limit_files=c["limit_files"])
        if continuation is None:
            continuation = not context_mode and not overrides
        base = replace(c["d2a"], **c.get("base", {})) if continuation else c["d2a"]
        feature_cache: dict = {}  # teacher-data target features, computed once for all runs
        with clock(drafter_name):
            results["drafter"] = train_drafter(base, target_dir, teacher_path, out / drafter_name,
                                               corpus_ids, feature_cache)
        name = drafter_name
        for ph in (c["continuation"] if continuation else []):
            prev = out / name / "final"
            if ph.from_export:
                prev = export_model(prev, out / name / "export-fp16", "drafter")
            name = f"{drafter_name}-{ph.name}"
            with clock(name):
                cfg = replace(c["d2a"], init_from=str(prev), stage0_steps=0, stage1_steps=0,
                              stage2_steps=ph.stage2_steps, lr2=ph.lr2, use_docstring_data=True,
                              docstring_rows=ph.docstring_rows)
                print(f"D2A continuation {ph.name}: {ph.stage2_steps} Stage II steps, lr2 {ph.lr2}, "
                      f"from {prev}", file=sys.stderr)
                results[name] = train_drafter(cfg, target_dir, teacher_path, out / name,
                                              feature_cache=feature_cache)
        results["drafter_final"] = name
    if "ar-draft" in stages and not (out / "ar-draft" / "final" / "metrics.json").exists():
        with clock("ar-draft"):
            results["ar-draft"] = train_ar_draft(c["ar"], target_dir, teacher_path, out / "ar-draft")
    results["timing"] = clock.record(out, preset)
    return results


class StageClock:
    """Wall time of each stage of one `run`: `with clock("target"): ...`."""

    def __init__(self):
        self.started = time.time()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.monotonic() - t0, 2)

    def record(self, out: Path, preset: str) -> dict:
        """Append this run's times to out/timing.jsonl and print them; returns the record."""
        total = round(time.time() - self.started, 2)
        rec = {"preset": preset, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
               "stages_s": self.seconds, "total_s": total}
        with (out / "timing.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{preset}: {total / 60:.1f} min in all ("
              + ", ".join(f"{k} {v / 60:.1f}" for k, v in self.seconds.items()) + ")", file=sys.stderr)
        return rec


def export(out: Path, assets: Path, drafter_name: str = "drafter") -> None:
    """Copy the final weights into the package: target in float32 (it defines the output),
    drafters in float16 (half the bytes; loaded back as float32)."""
    for name, src in [("target", out / "target" / "final"), ("drafter", out / drafter_name / "final"),
                      ("ar-draft", out / "ar-draft" / "final")]:
        if not src.exists():
            print(f"skip {name}: {src} missing", file=sys.stderr)
            continue
        export_model(src, assets / name, name)
        print(f"exported {name} -> {assets / name}")


def export_model(src: Path, dst: Path, kind: str) -> Path:
    """One model dir as shipped: the target in float32, drafters in float16."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    import deer_serve.models  # noqa: F401  (registers DeerDrafter)

    loader = AutoModel if kind == "drafter" else AutoModelForCausalLM
    dtype = torch.float32 if kind == "target" else torch.float16
    if dst.exists():
        shutil.rmtree(dst)
    if kind == "drafter":
        from deer_serve.drafters import drafter_format

        if drafter_format(src) == "dflash":
            from deer_serve.models.dflash import export_dflash

            export_dflash(src, dst, dtype)
            return dst
    model = loader.from_pretrained(src)
    model.to(dtype).save_pretrained(dst, safe_serialization=True)
    for f in Path(src).iterdir():
        if f.suffix in (".json", ".txt") and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
    return dst


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["drafter"]:  # a drafter for any target (deer_serve.training.drafter_cli)
        from deer_serve.training.drafter_cli import main as drafter_main

        return drafter_main(argv[1:])
    ap = argparse.ArgumentParser(prog="deer-serve train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-code", choices=["tiny-code", "smoke"])
    ap.add_argument("--out", type=Path, default=Path("runs/tiny-code"))
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ",".join(STAGES))
    ap.add_argument("--context-mode", choices=["tokens", "target-features"], default=None)
    ap.add_argument("--arch", choices=["deer", "dflash"], default=None,
                    help="drafter architecture: deer (DeerDrafter) or dflash (the DFlash format "
                         "vLLM runs natively); default deer")
    ap.add_argument("--drafter-name", default="drafter", help="sub-directory of the drafter run")
    ap.add_argument("--alpha", type=float, default=None, help="Stage II weight base")
    ap.add_argument("--init-layers", choices=["first", "last", "none"], default=None,
                    help="which target layers initialise the drafter's")
    ap.add_argument("--stage0-steps", type=int, default=None,
                    help="optional Stage 0: masked-diffusion steps on raw corpus windows first")
    ap.add_argument("--stage1-steps", type=int, default=None)
    ap.add_argument("--stage2-steps", type=int, default=None)
    ap.add_argument("--lr2", type=float, default=None, help="Stage II peak learning rate")
    ap.add_argument("--init-from", default=None,
                    help="continue D2A from a trained drafter directory (e.g. deer_serve/assets/drafter)")
    ap.add_argument("--no-docstring-data", action="store_true",
                    help="D2A on the teacher's corpus continuations only (as the runs before the "
                         "docstring-prompt data; the Stage I only row of the model card)")
    ap.add_argument("--docstring-rows", type=int, default=None,
                    help="train on the first N rows of the teacher's docstring set only")
    ap.add_argument("--train-embeddings", action="store_true",
                    help="train the drafter's token embeddings (= its tied output head) too; by "
                         "default they stay the target's, frozen")
    ap.add_argument("--no-continuation", action="store_true",
                    help="the base drafter run only, without the preset's Stage II continuation "
                         "phases (they run by default when no D2A flag changes the recipe)")
    ap.add_argument("--ar-steps", type=int, default=None, help="AR draft baseline steps")
    ap.add_argument("--export", type=Path, default=None, help="copy final weights to this assets dir")
    a = ap.parse_args(argv)
    stages = tuple(s for s in a.stages.split(",") if s)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stages {bad}")
    ov = {k: v for k, v in [("arch", a.arch), ("alpha", a.alpha), ("init_layers", a.init_layers),
                            ("stage0_steps", a.stage0_steps), ("stage1_steps", a.stage1_steps),
                            ("stage2_steps", a.stage2_steps), ("lr2", a.lr2),
                            ("init_from", a.init_from), ("docstring_rows", a.docstring_rows)]
          if v is not None}
    if a.no_docstring_data:
        ov["use_docstring_data"] = False
    if a.train_embeddings:
        ov["freeze_embeddings"] = False
    res = run(a.preset, a.out, stages, a.context_mode, a.drafter_name, ov, a.ar_steps,
              continuation=False if a.no_continuation else None)
    final = res.pop("drafter_final", a.drafter_name)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "config"} for k, v in res.items()},
                     indent=1, default=str))
    if a.export:
        export(a.out, a.export, final)


if __name__ == "__main__":
    main()
