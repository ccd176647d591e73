"""Service-side parts the library finds by name, never by import: Python entry points.

`deer_serve` never imports Ray or `deployments` (DESIGN.md section 1; tests/deer_serve/test_boundary.py
checks it). Where a library feature needs the service side, the package that provides it
declares an entry point in pyproject.toml and the library loads it here, so no module of
`deer_serve` names a `deployments` module in its code, and an install without the service side
gets a clear error instead of an ImportError from deep inside.

Groups (the names are the contract; pyproject.toml declares deer-serve's own):
  deer_serve.bench_services  `local`: a class (target_path, drafter_path, block_size,
                             startup_timeout_s=..., extra_args=None) whose instances are context
                             managers that start the app in this process and set `.url`
                             (`deer-serve bench`'s service methods without --url)
  deer_serve.drafter_sources NAME: a function (spec, timeout_s) -> a drafter, for
                             DEER_VLLM_DRAFTER=NAME:SPEC (`deer_serve.targets.vllm_proposer`)
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

BENCH_SERVICES = "deer_serve.bench_services"
DRAFTER_SOURCES = "deer_serve.drafter_sources"

# Said whenever a plugin is missing: deer-serve's own plugins live in `deployments`, which an
# editable install of this repository with the serve extra provides (`make install` does it).
INSTALL_HINT = "pip install -e '.[serve]' in a deer-serve checkout, or `make install`"


class PluginMissing(LookupError):
    """No entry point of that name in that group, or it failed to load."""


def names(group: str) -> list[str]:
    """The names registered in `group` (sorted)."""
    return sorted({ep.name for ep in entry_points(group=group)})


def load(group: str, name: str) -> Any:
    """The object entry point `name` of `group` names (imported now)."""
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        have = ", ".join(names(group)) or "none"
        raise PluginMissing(f"no {name!r} registered in entry point group {group!r} "
                            f"(registered: {have}); {INSTALL_HINT}")
    try:
        return found[0].load()
    except ImportError as e:  # the package is installed but a dependency (ray, ...) is not
        raise PluginMissing(f"{group} {name!r} ({found[0].value}) failed to import: "
                            f"{type(e).__name__}: {e}; {INSTALL_HINT}") from e
