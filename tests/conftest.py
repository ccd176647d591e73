"""Shared fixtures: a tiny byte-level BPE tokenizer, tiny random Qwen3 targets and DeerDrafters.

Everything is made on the fly from seeds (nothing is downloaded): the tokenizer once per
session, the models in a few milliseconds each.
"""

from __future__ import annotations

import pytest

from tiny_models import REPO, TOKENIZER_TEXTS, build_tokenizer, make_target  # noqa: F401

@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tokenizer):
    """Saved tiny target (with the tokenizer) and drafters of both context modes:
    {"target": dir, "drafter-tokens": dir, "drafter-target-features": dir,
    "drafter-dflash": dir}."""
    from deer_serve.models import make_tiny_drafter

    root = tmp_path_factory.mktemp("ckpt")
    target = make_target(vocab_size=len(tokenizer), seed=0)
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    dirs = {"target": root / "target"}
    for mode in ("tokens", "target-features"):
        d = root / f"drafter-{mode}"
        make_tiny_drafter(target.config, context_mode=mode, seed=1).save_pretrained(d)
        dirs[f"drafter-{mode}"] = d
    from deer_serve.models.dflash import make_tiny_dflash

    # a DFlash-format drafter reading the target's decoder layers 0 and 1
    make_tiny_dflash(target, [0, 1], num_layers=1, seed=2).save_pretrained(root / "drafter-dflash")
    dirs["drafter-dflash"] = root / "drafter-dflash"
    return dirs


def pytest_collection_modifyitems(session, config, items):
    """Modules with a `service` test run last, whole and in their collected order, the live-app
    folder (tests/deployments/service) first: its session-scoped local Ray cluster and Serve app
    (its conftest) stay up to the end, and the other service modules deploy beside it instead of
    starting a cluster each. The fast in-process tests fail first under -x."""
    service = {it.module for it in items if it.get_closest_marker("service")}

    def group(it) -> int:
        if it.module not in service:
            return 0
        return 1 if it.path.parent.name == "service" else 2

    items.sort(key=group)  # stable: the collected order within each group
