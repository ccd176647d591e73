"""The remote Drafter deployment as the drafter of vLLM's `DeerProposer`
(`DEER_VLLM_DRAFTER=serve:APP/DEPLOYMENT`, e.g. `serve:default/Drafter`).

`deer_serve.targets.vllm_proposer` finds `remote_drafter` through the
`deer_serve.drafter_sources` entry point `serve` (pyproject.toml; `deer_serve.plugins`), so the
proposer imports neither Ray nor `deployments`. The drafter is `RemoteDrafter`, the same client
the router uses.
"""

from __future__ import annotations

from deployments.clients import RemoteDrafter


def remote_drafter(spec: str, timeout_s: float) -> RemoteDrafter:
    """`APP/DEPLOYMENT` (app default "default", deployment default "Drafter") -> a
    `RemoteDrafter` over that deployment of the running Serve app (its `context_mode` and
    `feature_layers` come from the deployment's meta)."""
    from ray import serve

    app, _, name = spec.partition("/")
    handle = serve.get_deployment_handle(name or "Drafter", app_name=app or "default")
    meta = handle.meta.remote().result(timeout_s=timeout_s)
    return RemoteDrafter(handle, meta, timeout_s)
