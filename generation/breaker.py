"""The circuit breaker: a run stops when its endpoint is clearly broken, instead of failing
every request after its retries (and planning more of them) and ending as a success.

It watches the outcomes of the last `window` requests made (cached answers are not requests):
once `min_requests` are in and at least `max_failure_share` of them failed, it trips and
names why. The ledger then skips every request not yet started; the flow stops at the chunk
that tripped it, before that chunk is checkpointed, so a rerun resumes there and requests
again only what was not answered (the answers are in the cache). The outcomes cross chunks in
the chunk reports (`GenerationReport.outcomes`), so a run of small chunks trips it too.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from booksmith.schemas.config import BreakerSettings


class EndpointFailing(RuntimeError):
    """The breaker tripped: the message says why and how to resume."""


class Breaker:
    def __init__(self, settings: BreakerSettings, history: Iterable[str] = ()) -> None:
        self.settings = settings
        # "" for a success, else the failure reason (http_503, connection, timeout, ...)
        self.outcomes: deque[str] = deque(history, maxlen=settings.window)
        self.tripped: str | None = None
        self._check()

    def record(self, error: str | None) -> None:
        self.outcomes.append(error or "")
        self._check()

    def _check(self) -> None:
        s = self.settings
        if self.tripped or s.max_failure_share is None or len(self.outcomes) < s.min_requests:
            return
        failed = Counter(o for o in self.outcomes if o)
        if sum(failed.values()) >= s.max_failure_share * len(self.outcomes):
            reasons = ", ".join(f"{k}: {n}" for k, n in failed.most_common(3))
            self.tripped = (
                f"the endpoint failed {sum(failed.values())} of the last {len(self.outcomes)} "
                f"requests ({reasons})"
            )
