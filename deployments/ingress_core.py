"""What the HTTP and gRPC ingress methods use of the Router (`deployments.router.Router`): one
declaration for both adapters, for the type checker; the Router provides them. And the `Slot`
its `admit` hands out, one per admitted request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

if TYPE_CHECKING:
    from deployments.router import Prepared, Router, RouterSettings
    from deployments.schemas import RequestKind, Usage
    from deployments.security import ApiKeys
    from deployments.session import Outcome


class IngressCore:
    if TYPE_CHECKING:
        settings: RouterSettings
        keys: ApiKeys
        drafter: Any
        verifier: Any

        def admit(self, key: Optional[str], protocol: str) -> Slot: ...
        async def prepare(self, data: Any, kind: RequestKind) -> Prepared: ...
        async def complete(self, p: Prepared) -> tuple[Outcome, str]: ...
        def stream(self, p: Prepared) -> AsyncIterator[tuple[str, list[int],
                                                             Optional[Outcome]]]: ...
        def usage(self, p: Prepared, o: Outcome) -> Usage: ...
        def _count_error(self, e: Exception, status: int) -> None: ...
        def _count_cancelled(self, what: str) -> None: ...


class Slot:
    """One admitted request (bounded by `max_pending_requests`); release() is idempotent."""

    def __init__(self, router: Router):
        self.router, self.held = router, True
        router._active += 1
        router.metrics.inflight.set(router._active)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.router._active -= 1
            self.router.metrics.inflight.set(self.router._active)
