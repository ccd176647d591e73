"""The library never imports the service side (DESIGN.md section 1: "The algorithm lives in
`deer_serve` and never imports Ray"): no module under deer_serve/ imports `ray` or
`deployments`, at module level or inside a function, except deer_serve/serve_cli.py, which
starts the app. Where the library needs the service side it loads an entry point
(`deer_serve.plugins`).

An AST scan of every import statement (and of `importlib.import_module("...")` /
`__import__("...")` calls with a literal name), so an import the tests never execute is caught
too; the planted-offender test shows the scan finds each form."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tiny_models import REPO

FORBIDDEN = ("ray", "deployments")
ALLOWED = {"serve_cli.py"}  # relative to deer_serve/: the one module that starts Ray and the app
GENERATED = {"protos/deer_pb2.py", "protos/deer_pb2_grpc.py"}


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def offenders_in(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
    """(line, imported module) of every import of a FORBIDDEN top-level package in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and _forbidden(node.module):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            arg = node.args[0]
            if fname in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str) and _forbidden(arg.value):
                found.append((node.lineno, arg.value))
    return sorted(found)


def offenders(root: Path) -> list[str]:
    """"path:line imports module" for every module under root (a deer_serve package dir)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in ALLOWED or rel in GENERATED:
            continue
        for line, mod in offenders_in(path.read_text(), str(path)):
            out.append(f"deer_serve/{rel}:{line} imports {mod}")
    return out


def test_deer_serve_imports_neither_ray_nor_deployments():
    assert offenders(REPO / "deer_serve") == []


def test_the_scan_finds_every_form_of_import(tmp_path):
    """A planted offender of each kind is found (and the allowed module is skipped)."""
    pkg = tmp_path / "deer_serve"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "top.py").write_text("import ray\nimport os, ray.serve as s\n")
    (pkg / "sub" / "lazy.py").write_text(
        "def f():\n"
        "    from ray import serve\n"
        "    from deployments.drafter import RemoteDrafter\n"
        "    import importlib\n"
        "    return importlib.import_module('deployments.app')\n"
        "class C:\n"
        "    def g(self):\n"
        "        return __import__('ray')\n")
    (pkg / "fine.py").write_text("import rayon\nimport raytracing.x\nfrom . import ray\n"
                                 "from deer_serve import deployments_doc\nx = 'import ray'\n")
    (pkg / "serve_cli.py").write_text("import ray\n")
    assert offenders(pkg) == [
        "deer_serve/sub/lazy.py:2 imports ray",
        "deer_serve/sub/lazy.py:3 imports deployments.drafter",
        "deer_serve/sub/lazy.py:5 imports deployments.app",
        "deer_serve/sub/lazy.py:8 imports ray",
        "deer_serve/top.py:1 imports ray",
        "deer_serve/top.py:2 imports ray.serve",
    ]


def test_the_service_side_is_registered_as_entry_points():
    """What the library loads instead of importing: deer-serve's own plugins resolve (this needs
    the package installed from this checkout's pyproject.toml, as `make install` does)."""
    from deer_serve import plugins

    if "local" not in plugins.names(plugins.BENCH_SERVICES):
        pytest.fail("entry point deer_serve.bench_services:local missing: the installed "
                    "metadata is older than pyproject.toml; run `make install`")
    from deployments.bench_service import LocalService
    from deployments.vllm_remote import remote_drafter

    assert plugins.load(plugins.BENCH_SERVICES, "local") is LocalService
    assert plugins.load(plugins.DRAFTER_SOURCES, "serve") is remote_drafter
    with pytest.raises(plugins.PluginMissing, match="registered"):
        plugins.load(plugins.DRAFTER_SOURCES, "no-such-source")
