"""Write docs/CONFIG.md: the service configuration reference, generated from the pydantic
models (`Field(description=...)`) of the app config and every model it nests.

    python scripts/gen_config_docs.py            # rewrite docs/CONFIG.md (`make config-docs`)
    python scripts/gen_config_docs.py --check    # exit 1 when docs/CONFIG.md is stale

Imports only the config models (pydantic); it starts no Ray and loads no model.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import deployments.schemas as schemas  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

OUT = REPO / "docs" / "CONFIG.md"


def app_config() -> type[BaseModel]:
    """AppConfig, from deployments.schemas when it lives there, else from deployments.app."""
    cls = getattr(schemas, "AppConfig", None)
    if cls is None:
        from deployments.app import AppConfig as cls  # pydantic models only; no Ray import
    return cls


def nested_models(tp) -> list[type[BaseModel]]:
    """The BaseModel classes inside an annotation (Optional[X], list[X], dict[str, X], ...)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in nested_models(arg)]


def all_models(root: type[BaseModel]) -> dict[type[BaseModel], list[str]]:
    """root, then each nested model once, in the order its first field appears, with the
    fields (`Model.field`) that hold it."""
    seen: dict[type[BaseModel], list[str]] = {}

    def visit(cls: type[BaseModel], where: str) -> None:
        if cls in seen:
            seen[cls].append(where)
            return
        seen[cls] = [where] if where else []
        for name, f in cls.model_fields.items():
            for m in nested_models(f.annotation):
                visit(m, f"{cls.__name__}.{name}")

    visit(root, "")
    return seen


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    if tp is typing.Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def changed(value: BaseModel, prefix: str = "") -> list[str]:
    """`a.b=v` for each field of `value` that differs from its model's own default."""
    out = []
    base = type(value)()
    for name in type(value).model_fields:
        v, d = getattr(value, name), getattr(base, name)
        if isinstance(v, BaseModel):
            out += changed(v, f"{prefix}{name}.")
        elif v != d:
            out.append(f"{prefix}{name}: {json.dumps(v)}")
    return out


def default_text(f) -> str:
    if f.is_required():
        return "required"
    value = f.default if f.default is not PydanticUndefined else f.default_factory()
    if isinstance(value, BaseModel):
        diff = changed(value)
        return "its defaults" if not diff else "; ".join(f"`{d}`" for d in diff) + "; else its defaults"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 16 \
            and value & (value - 1) == 0:
        return f"`{value}` (2^{value.bit_length() - 1})"
    return f"`{json.dumps(value)}`"  # as YAML reads it: null, true, [], "text"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table(cls: type[BaseModel], used_in: list[str]) -> list[str]:
    doc = " ".join((cls.__doc__ or "").split())
    lines = [f"## {cls.__name__}", ""]
    if doc and not doc.startswith("Usage docs:"):  # (pydantic's BaseModel docstring)
        lines += [doc, ""]
    notes = []
    if used_in:
        notes.append("The value of " + ", ".join(f"`{w}`" for w in used_in) + ".")
    if cls.model_config.get("extra") == "forbid":
        notes.append("Unknown keys are an error.")
    if notes:
        lines += [" ".join(notes), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, f in cls.model_fields.items():
        desc = f.description or ""
        if not desc:
            inner = [m.__name__ for m in nested_models(f.annotation)]
            desc = f"see {', '.join(inner)}" if inner else ""
        lines.append(f"| `{name}` | {type_name(f.annotation)} | {cell(default_text(f))} "
                     f"| {cell(desc)} |")
    return lines + [""]


def render() -> str:
    root = app_config()
    lines = [
        "# Service configuration",
        "",
        "<!-- generated by scripts/gen_config_docs.py (`make config-docs`) from the pydantic",
        "     models in deployments/; edit the Field descriptions there, not this file -->",
        "",
        "The application's `args` (in `cluster/serve_config.yaml`, read by `deer-serve serve`",
        f"and `serve run`) are the fields of `{root.__name__}`; its nested sections are the",
        "models below. Omitted model paths mean the embedded default pair. Example:",
        "",
        "```yaml",
        "applications:",
        "  - name: deer",
        "    import_path: deployments.app:build_app",
        "    args:",
        "      block_size: 16",
        "      service: {loop: colocated, api_keys: [\"KEY\"]}",
        "      verifier: {num_replicas: 2, ray_actor_options: {num_gpus: 1}}",
        "```",
        "",
    ]
    for cls, used_in in all_models(root).items():
        lines += table(cls, used_in)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/CONFIG.md is stale")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        ok = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if ok else 'stale; run make config-docs'}")
        return 0 if ok else 1
    args.out.write_text(text)
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
