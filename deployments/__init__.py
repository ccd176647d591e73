"""Ray Serve deployments of deer-serve: Drafter, Verifier, the Router ingress, the app builder.

Plain classes; only `deployments.app.build_app` wraps them with `serve.deployment`.
"""
