"""One request in the step engine (`deer_serve.step_engine.StepEngine.submit`): the caller's
handle, which streams the request's StepOutputs back from the engine's loop and cancels it."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any, Generator, Optional

from deer_serve.engine import StepOutput
from deer_serve.types import GenerationResult

if TYPE_CHECKING:
    from deer_serve.step_engine import StepEngine


class EngineRequest:
    """One submitted request: iterate it for its StepOutputs (the iteration returns its
    GenerationResult, so `yield from req` works as with `iter_generate`); `cancel()` removes it
    from the engine at the next step boundary and releases its caches. Leaving the iteration
    early cancels it too."""

    def __init__(self, engine: "StepEngine", seq_id: str, core: Generator, use_drafter: bool,
                 lookup: bool):
        self.engine, self.seq_id, self.core = engine, seq_id, core
        self.use_drafter, self.lookup = use_drafter, lookup
        self.call: Any = None            # the decode's pending call (Plan / Draft / Score)
        self.cancelled = threading.Event()
        self.finished = threading.Event()  # left the engine (done, failed or cancelled)
        self.result: Optional[GenerationResult] = None
        self.error: Optional[BaseException] = None
        self._q: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._end: Optional[tuple[str, Any]] = None  # the last event, when `poll` met it

    def cancel(self) -> None:
        if not self.finished.is_set():
            self.cancelled.set()
            self.engine._wake()

    def __iter__(self) -> Generator[StepOutput, None, GenerationResult]:
        try:
            while True:
                kind, val = self._end if self._end is not None else self._q.get()
                if kind == "step":
                    yield val
                elif kind == "done":
                    return val
                else:
                    raise val
        finally:
            self.cancel()  # a no-op once it finished

    def poll(self) -> list[StepOutput]:
        """The steps delivered so far and not yet read, without waiting (for a caller that runs
        `StepEngine.step()` itself); iterating afterwards gives the rest and the result."""
        out = []
        while self._end is None:
            try:
                kind, val = self._q.get_nowait()
            except queue.Empty:
                break
            if kind == "step":
                out.append(val)
            else:
                self._end = (kind, val)
        return out

    def _put(self, kind: str, val: Any) -> None:
        self._q.put((kind, val))
