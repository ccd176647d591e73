"""Whether drafting pays: per request from its own acceptance (`AdaptiveK`), and learned
across the requests of one process (`DraftGate`).

Per-request adaptive k (`AdaptiveK`) stops drafting when a request's own acceptance is
low, but each request has to draft a few cycles to learn that, and every probe after an AR
stretch costs a cycle again. Where drafts are rarely accepted for any request at some
temperature (the embedded pair at T=0.6: about 0.7 accepted drafts per cycle, while a cycle costs
about three plain steps), those cycles are the whole loss, and DEER is slower than plain
sampling.

The gate keeps, per temperature, a moving average of accepted drafts per cycle over every
request's drafting cycles. Below `min_tau`, a new request at that temperature starts with
drafting off (plain AR steps only), except every `probe_every`-th one, which drafts as usual and
keeps the average current; above it (or before `min_cycles` cycles were seen) requests draft.
Greedy requests (temperature 0) never go through the gate: their drafts are accepted far more
often (on the embedded pair tau 3.5-4.5 at T=0 against 0.7 at T=0.6), a greedy cycle costs less
(no sampling of q or p), and per-request adaptive k already stops drafting where it does not
pay; a gate closed on a stretch of hard prompts would cost the easy ones that follow.

Exactness: the gate's choice for a request depends only on OTHER requests' past acceptance,
never on this request's drafts or samples, so every request's output keeps the target's law
(and greedy output is the plain AR output). But its block sizes, and so which random numbers it
draws, would depend on other requests: a request with a seed therefore never goes through the
gate where deer-serve decides (`gate_for`: the service and `deer-serve generate`), so it repeats.
"""

from __future__ import annotations

import threading
from typing import Optional

OFF = 1 << 30  # AR steps that stand for "never draft in this request"


class DraftGate:
    def __init__(self, min_tau: float = 2.0, probe_every: int = 8, min_cycles: int = 16,
                 decay: float = 0.98):
        """min_tau: accepted drafts per cycle below which drafting does not pay (a cycle costs
        about 3 plain steps on the embedded pair, so it must yield 3 tokens: tau 2); decay: of
        the per-cycle moving average (0.98: about the last 50 cycles count)."""
        if probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {probe_every}")
        self.min_tau, self.probe_every = float(min_tau), int(probe_every)
        self.min_cycles, self.decay = int(min_cycles), float(decay)
        self._lock = threading.Lock()
        self._tau: dict[float, float] = {}     # temperature -> moving average of accepted drafts
        self._cycles: dict[float, int] = {}    # temperature -> drafting cycles seen
        self._closed_starts: dict[float, int] = {}  # requests started while closed (probe count)
        self.gated = self.probes = 0           # requests started with drafting off / probing

    @staticmethod
    def key(temperature: float) -> float:
        return round(float(temperature), 2)

    def is_open(self, temperature: float) -> bool:
        k = self.key(temperature)
        with self._lock:
            return self._open(k)

    def _open(self, k: float) -> bool:
        return k == 0 or self._cycles.get(k, 0) < self.min_cycles or self._tau[k] >= self.min_tau

    def start(self, temperature: float) -> int:
        """AR steps a new request at this temperature starts with: 0 (draft) or OFF."""
        k = self.key(temperature)
        with self._lock:
            if self._open(k):
                return 0
            n = self._closed_starts.get(k, 0) + 1
            self._closed_starts[k] = n
            if n % self.probe_every == 0:
                self.probes += 1
                return 0
            self.gated += 1
            return OFF

    def observe(self, temperature: float, accepted: int) -> None:
        """One drafting cycle of some request at this temperature accepted `accepted` drafts."""
        k = self.key(temperature)
        if k == 0:  # greedy requests are not gated (module docstring)
            return
        with self._lock:
            n = self._cycles.get(k, 0)
            prev: Optional[float] = self._tau.get(k)
            self._tau[k] = float(accepted) if prev is None else \
                self.decay * prev + (1 - self.decay) * float(accepted)
            self._cycles[k] = n + 1

    def state(self) -> dict:
        """{temperature: {"tau", "cycles", "open"}} (metrics, tests)."""
        with self._lock:
            return {k: {"tau": round(self._tau[k], 3), "cycles": self._cycles[k],
                        "open": self._open(k)} for k in self._tau}


def gate_for(gate: Optional[DraftGate], seed: Optional[int]) -> Optional[DraftGate]:
    """The gate a request goes through: none for a seeded request (it must repeat whatever other
    requests did before it)."""
    return gate if seed is None else None


class AdaptiveK:
    """Per-request block size from its acceptance history.

    An exponential moving average `tau` of the accepted drafts per cycle (start: `start`) sets
    k to the smallest power of two >= 2 * tau + 2, within [min_k, max_k]. A block much longer
    than what gets accepted costs verify and draft time for nothing; one as long as what gets
    accepted caps the cycle's gain. Powers of two keep the k of concurrent requests few, so a
    batched drafter forms few groups.

    When tau falls below `ar_below` (drafting no longer pays: a cycle yields under
    1 + ar_below tokens), k is 0 for `ar_steps` steps: plain AR steps of the target, no draft.
    Then one cycle drafts again (a probe); if tau stays low the next AR stretch is twice as
    long (up to `max_ar_steps`), else it is back to `ar_steps`. `ar_below=0` never stops
    drafting. Every choice depends only on past acceptance, so output stays exact and a seeded
    run repeats."""

    def __init__(self, max_k: int, min_k: int = 2, start: float = 3.0, decay: float = 0.7,
                 ar_below: float = 1.0, ar_steps: int = 8, max_ar_steps: int = 64,
                 gate: Optional[DraftGate] = None, temperature: float = 0.0):
        """gate: a process's `DraftGate` (deer_serve.adaptive), which may start the request
        with drafting off and learns from its cycles; temperature: the request's (the gate's
        key)."""
        self.max_k, self.min_k = max_k, min(min_k, max_k)
        self.tau, self.decay = start, decay
        self.ar_below, self.ar_steps, self.max_ar_steps = ar_below, ar_steps, max_ar_steps
        self.ar_left, self.ar_len = 0, ar_steps
        self.gate, self.temperature = gate, temperature
        if gate is not None:
            self.ar_left = gate.start(temperature)

    def next_k(self) -> int:
        """The next cycle's block size; 0 = a plain AR step."""
        if self.ar_left > 0:
            self.ar_left -= 1
            return 0
        want, k = round(2 * self.tau + 2), 1
        while k < want:
            k *= 2
        return max(self.min_k, min(self.max_k, k))

    def update(self, accepted: int, k: int) -> None:
        # a block that was accepted whole says only "at least k": count it a bit higher
        if self.gate is not None:
            self.gate.observe(self.temperature, accepted)
        a = accepted + (1 if accepted == k else 0)
        self.tau = self.decay * self.tau + (1 - self.decay) * a
        if self.tau < self.ar_below:
            self.ar_left = self.ar_len
            self.ar_len = min(self.max_ar_steps, 2 * self.ar_len)
        else:
            self.ar_len = self.ar_steps
