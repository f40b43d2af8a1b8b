"""The live client's limits: concurrency, requests and tokens per minute, adapting to 429s.

The configured `max_concurrency`, `requests_per_minute` and `tokens_per_minute` are ceilings.
With `generation.adaptive.enabled` (the default), once `decrease_at_share` of the answers
since the last decrease are 429s (the rate is the cause, not a few scattered refusals), the
concurrency and the request rate are multiplied by `decrease` (a 429 to a request sent before
the last decrease says nothing new), and that 429's `Retry-After` pauses every dispatch; so do
the `x-ratelimit-remaining-*` / `x-ratelimit-reset-*` headers when a limit is spent. While
requests succeed, the concurrency grows by one per window of successes and the rate by
`increase` of its value at the last decrease per answer (AIMD), back to the ceilings. Both
steps count answers, not seconds, so scattered 429s at a steady share (below
`decrease_at_share`) do not wear the rate down however fast or slow the endpoint is.

Rates are enforced by GCRA pacing (a theoretical arrival time per limit, `burst_s` of
tolerance): a request reserves its slot at once and sleeps only when it is early, so an
unthrottled request pays a few comparisons and no await. Tokens are charged as estimated and
topped up with what the answer used beyond it (the next requests wait for the difference).

`RateSeries` is the effective rate over time for the run report: one point per `interval_s`
(requests sent, 429s, the limits then), merged pairwise past `max_points`, so it stays small
whatever the run's length.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from booksmith.schemas.config import AdaptiveSettings

RatePoint = dict[str, Any]  # {"t_s", "interval_s", "requests", "rpm", "limit_rpm", ...}
RATE_POINTS = 120  # a run's series, its chunks' joined, is at most this long
MIN_ANSWERS = 20  # answers since the last decrease before 429s among them lower the limits
NUDGE = 0.9  # the rate's step back at a 429 below `decrease_at_share` (once in 40 answers)


class Pacer:
    """GCRA: `rate` units per second, `burst_s` seconds' worth may pass at once."""

    __slots__ = ("burst_s", "rate", "tat")

    def __init__(self, rate: float, burst_s: float) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.tat = 0.0  # theoretical arrival time of the next unit

    def reserve(self, amount: float, now: float) -> float:
        """Take `amount` units; the seconds to wait before using them (0: now)."""
        tat = self.tat if self.tat > now else now
        start = tat - self.burst_s
        self.tat = tat + amount / self.rate
        return start - now if start > now else 0.0

    def charge(self, amount: float) -> None:
        """Units used beyond a reservation: later reservations wait for them."""
        self.tat += amount / self.rate

    def hold_until(self, when: float) -> None:
        """Nothing passes before `when` (a server's pause), then the burst at most."""
        if self.tat < when + self.burst_s:
            self.tat = when + self.burst_s


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """Seconds in an `x-ratelimit-reset-*` header: "20ms", "1s", "6m0s", "1h2m3.5s" or "0.5"."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _header_int(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


class RateSeries:
    """Requests sent and 429s per interval, with the limits at the interval's end."""

    def __init__(self, interval_s: float, max_points: int, start: float) -> None:
        self.interval_s = interval_s
        self.max_points = max_points
        self.start = start
        self.next_at = start + interval_s
        self.points: list[RatePoint] = []
        self.sent = 0  # in the current interval
        self.limited = 0

    def close_interval(self, now: float, limit_rpm: float | None, concurrency: int) -> None:
        span = now - (self.next_at - self.interval_s)
        if span <= 0:
            return
        self.points.append(
            _point(
                t_s=now - self.start,
                interval_s=span,
                requests=self.sent,
                rate_limited=self.limited,
                limit_rpm=limit_rpm,
                concurrency=concurrency,
            )
        )
        self.sent = self.limited = 0
        self.next_at = now + self.interval_s
        if len(self.points) > self.max_points:
            self.points = downsample(self.points)
            self.interval_s *= 2


def _point(
    *,
    t_s: float,
    interval_s: float,
    requests: int,
    rate_limited: int,
    limit_rpm: float | None,
    concurrency: int,
) -> RatePoint:
    return {
        "t_s": round(t_s, 3),
        "interval_s": round(interval_s, 3),
        "requests": requests,
        "rpm": round(requests * 60 / interval_s, 1) if interval_s > 0 else 0.0,
        "rate_limited": rate_limited,
        "limit_rpm": None if limit_rpm is None else round(limit_rpm, 1),
        "concurrency": concurrency,
    }


def downsample(points: Sequence[RatePoint]) -> list[RatePoint]:
    """Adjacent pairs merged into one point (the later one's time and limits)."""
    out: list[RatePoint] = []
    for i in range(0, len(points), 2):
        pair = points[i : i + 2]
        last = pair[-1]
        out.append(
            _point(
                t_s=last["t_s"],
                interval_s=sum(p["interval_s"] for p in pair),
                requests=sum(p["requests"] for p in pair),
                rate_limited=sum(p["rate_limited"] for p in pair),
                limit_rpm=last["limit_rpm"],
                concurrency=last["concurrency"],
            )
        )
    return out


def append_series(
    total: Sequence[RatePoint], part: Sequence[RatePoint], offset_s: float, max_points: int
) -> list[RatePoint]:
    """A later stretch of the run (a chunk that started `offset_s` into it) after `total`."""
    out = [*total, *({**p, "t_s": round(p["t_s"] + offset_s, 3)} for p in part)]
    while len(out) > max_points:
        out = downsample(out)
    return out


def parallel_series(series: Sequence[Sequence[RatePoint]]) -> list[RatePoint]:
    """Partitions that ran side by side: their points summed by position."""
    out: list[RatePoint] = []
    for i in range(max((len(s) for s in series), default=0)):
        pts = [s[i] for s in series if i < len(s)]
        limits = [p["limit_rpm"] for p in pts]
        out.append(
            _point(
                t_s=max(p["t_s"] for p in pts),
                interval_s=max(p["interval_s"] for p in pts),
                requests=sum(p["requests"] for p in pts),
                rate_limited=sum(p["rate_limited"] for p in pts),
                limit_rpm=None if None in limits else sum(limits),
                concurrency=sum(p["concurrency"] for p in pts),
            )
        )
    return out


class Limits:
    """Concurrency and rate limits of one client; adaptive unless `settings.enabled` is off."""

    def __init__(
        self,
        *,
        max_concurrency: int,
        rpm: float | None,
        tpm: float | None,
        settings: AdaptiveSettings | None = None,
    ) -> None:
        s = settings or AdaptiveSettings()
        self.settings = s
        self.adaptive = s.enabled
        self.max_concurrency = max_concurrency
        self.max_rate = rpm / 60 if rpm else None  # requests per second: the ceiling
        self.min_rate = min(s.min_requests_per_minute / 60, self.max_rate or math.inf)
        self.min_concurrency = min(s.min_concurrency, max_concurrency)
        self.window = float(max_concurrency)  # the concurrency now (fractional while growing)
        self.slots = max_concurrency  # int(window), what acquire compares against
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.requests = Pacer(self.max_rate, s.burst_s) if self.max_rate else None
        self.tokens = Pacer(tpm / 60, s.burst_s) if tpm else None
        self.paused_until = 0.0
        # whether the rate / the slots held a request back since the last increase: only
        # then is there a reason to raise them (a limit nobody reaches is not tested)
        self.paced = self.saturated = False
        self.last_decrease = -math.inf
        self.answers = self.refusals = 0  # answers (429s) since the last decrease
        self.seen = 0  # answers counted, ever
        self.nudged = -2 * MIN_ANSWERS  # `seen` at the last step back
        self.base_rate = 0.0  # the rate set by the last decrease: the additive step's unit
        self.decreases = 0
        self.rate_limited = 0  # 429 answers
        now = time.monotonic()
        self.series = RateSeries(s.interval_s, s.max_points, now)
        self._sent: deque[float] = deque(maxlen=512)  # recent send times: the observed rate

    # -- state ----------------------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """Requests per second allowed now (None: unlimited)."""
        return self.requests.rate if self.requests else None

    @property
    def adapting(self) -> bool:
        """Whether a 429 can still lower the limits (it is then their signal, not a failure)."""
        if not self.adaptive:
            return False
        rate = self.rate
        return self.slots > self.min_concurrency or rate is None or rate > self.min_rate * 1.001

    def state(self) -> dict[str, float | None]:
        """Where the limits are now: a later client of the same run starts from here."""
        return {"concurrency": self.window, "rate": self.rate, "base_rate": self.base_rate}

    def resume(self, state: Mapping[str, float | None] | None) -> None:
        """Start from an earlier client's limits (the run's previous chunk), within ceilings."""
        if not state or not self.adaptive:
            return
        window = state.get("concurrency")
        if window:
            self.window = max(float(self.min_concurrency), min(window, self.max_concurrency))
            self.slots = int(self.window)
        rate = state.get("rate")
        if rate:
            rate = max(self.min_rate, min(rate, self.max_rate or math.inf))
            self._set_rate(rate)
        self.base_rate = state.get("base_rate") or self.base_rate
        if self.base_rate and self.requests is not None:  # a limit was found: no bursts
            self.requests.burst_s = min(self.settings.burst_s, 1 / self.requests.rate)

    def start_series(self) -> None:
        """A new effective-rate series (one per run of the client)."""
        s = self.settings
        self.series = RateSeries(s.interval_s, s.max_points, time.monotonic())

    def _set_rate(self, rate: float) -> None:
        if self.requests is None:
            self.requests = Pacer(rate, self.settings.burst_s)
        else:
            self.requests.rate = rate

    # -- one request ----------------------------------------------------------------------------

    async def acquire(self, tokens: float) -> float:
        """Wait for a slot and the rate limits; returns when it began waiting (monotonic): a
        429 to a request that began before the last decrease says nothing new."""
        entered = time.monotonic()
        if self.in_flight >= self.slots or self._waiters:
            self.saturated = True
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self.release()  # the slot was given just before the cancellation
                else:
                    self._remove_waiter(fut)
                raise
        else:
            self.in_flight += 1
        now = time.monotonic()
        wait = self.paused_until - now
        if self.requests is not None:
            paced = self.requests.reserve(1.0, now)
            if paced > 0:
                self.paced = True
                wait = max(wait, paced)
        if self.tokens is not None and tokens:
            wait = max(wait, self.tokens.reserve(tokens, now))
        while wait > 0:  # early for the rate, or the server asked for a pause
            pause = self.paused_until
            try:
                await asyncio.sleep(wait)
            except BaseException:
                self.release()
                raise
            now = time.monotonic()
            wait = 0.0
            if self.paused_until != pause:
                # A pause began meanwhile: wait it out, and take a new place in the rate (held
                # to the pause's end), so the requests held back do not all go at once.
                wait = self.paused_until - now
                if self.requests is not None:
                    wait = max(wait, self.requests.reserve(1.0, now))
        series = self.series
        if now >= series.next_at:
            series.close_interval(now, self.limit_rpm, self.slots)
        series.sent += 1
        self._sent.append(now)
        return entered

    def _remove_waiter(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def _wake(self) -> None:
        """Give freed slots to waiters, first come first served."""
        while self._waiters and self.in_flight < self.slots:
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)

    def release(self) -> None:
        self.in_flight -= 1
        if self._waiters:
            self._wake()

    def used_tokens(self, extra: float) -> None:
        """The answer used `extra` tokens beyond its estimate."""
        if self.tokens is not None and extra > 0:
            self.tokens.charge(extra)

    @property
    def limit_rpm(self) -> float | None:
        rate = self.rate
        return None if rate is None else rate * 60

    # -- what the server said -------------------------------------------------------------------

    def succeeded(self, sent_at: float) -> None:
        """Additive increase: one slot per window of successes; the rate by its step."""
        if not self.adaptive:
            return
        if sent_at >= self.last_decrease:
            self._answered(refused=False)
        if self.saturated and self.slots < self.max_concurrency:
            self.saturated = False
            self.window = min(self.window + 1 / self.window, float(self.max_concurrency))
            if int(self.window) > self.slots:
                self.slots = int(self.window)
                if self._waiters:
                    self._wake()
        pacer = self.requests
        if self.paced and pacer is not None and self.base_rate > 0:
            self.paced = False
            ceiling = self.max_rate
            if ceiling is None or pacer.rate < ceiling:
                step = self.settings.increase * self.base_rate
                if self.refusals:
                    step *= 0.5  # 429s among the recent answers: near the edge, go slow
                pacer.rate = (
                    pacer.rate + step if ceiling is None else min(ceiling, pacer.rate + step)
                )

    def headers(self, headers: Mapping[str, str]) -> None:
        """`x-ratelimit-remaining-*` at zero pauses dispatch until its `x-ratelimit-reset-*`."""
        remaining = _header_int(headers, "x-ratelimit-remaining-requests")
        pause = 0.0
        if remaining is not None and remaining < 1:
            pause = parse_reset(headers.get("x-ratelimit-reset-requests")) or 0.0
        left = _header_int(headers, "x-ratelimit-remaining-tokens")
        if left is not None and left < 1:
            pause = max(pause, parse_reset(headers.get("x-ratelimit-reset-tokens")) or 0.0)
        if pause > 0:
            self.pause(pause)

    def pause(self, seconds: float) -> None:
        """Nothing is sent for `seconds`; then requests are spaced at the rate, no burst."""
        until = time.monotonic() + seconds
        if until > self.paused_until:
            self.paused_until = until
            if self.requests is not None:
                self.requests.hold_until(until)

    def rate_limited_answer(
        self, sent_at: float, retry_after: float | None, headers: Mapping[str, str] | None
    ) -> bool:
        """A 429 to the request that `acquire` let go (`sent_at`: what it returned). Returns
        whether it is the limiter's signal (the limits came or can come down) rather than a
        failure of the request."""
        self.rate_limited += 1
        self.series.limited += 1
        if not self.adaptive:
            return False
        signal = self.adapting
        # A 429 to a request sent before the last decrease was answered by it already.
        if sent_at < self.last_decrease:
            pass
        elif self._answered(refused=True):
            # by `decrease`, or to a little under what the server let through if that is less
            self._decrease(time.monotonic(), 0.9 * (1 - self.refusals / self.answers))
            if retry_after is not None and retry_after > 0:
                self.pause(retry_after)  # every request waits what the server asked
        elif self.requests is not None and self.seen - self.nudged >= 2 * MIN_ANSWERS:
            # a 429 near the edge of the limit: the rate steps back a little (at most once in
            # 40 answers, so scattered 429s at a steady share do not wear it down)
            self.nudged = self.seen
            self.requests.rate = max(self.min_rate, self.requests.rate * NUDGE)
            self.base_rate = self.base_rate or self.requests.rate
        if headers is not None:
            self.headers(headers)
        return signal

    def _answered(self, *, refused: bool) -> bool:
        """Count an answer to a request sent since the last decrease; True when the 429s among
        them reach `decrease_at_share` (of `MIN_ANSWERS` at least), or half of them (5 at
        least): the rate is the cause. A few scattered 429s (a busy shared endpoint, other
        jobs) are retried, nothing more."""
        self.seen += 1
        self.answers += 1
        self.refusals += refused
        if self.answers > 4 * MIN_ANSWERS:  # the older half weighs less
            self.answers //= 2
            self.refusals //= 2
        if not refused:
            return False
        if self.refusals >= MIN_ANSWERS // 4 and 2 * self.refusals >= self.answers:
            return True  # most answers refused: no need to wait for more
        return (
            self.answers >= MIN_ANSWERS
            and self.refusals >= self.settings.decrease_at_share * self.answers
        )

    def _decrease(self, now: float, let_through: float = 1.0) -> None:
        d = self.settings.decrease
        d = max(d * d, min(d, let_through))  # a share from few answers is rough: twice at most
        self.window = max(float(self.min_concurrency), self.window * d)
        self.slots = int(self.window)
        # From the rate set, or the rate actually sent over the last second where that is
        # lower (a limit far above what is sent, or none yet) and no pause distorts it.
        sent, cutoff = self._sent, now - 1.0
        n = sum(1 for t in sent if t >= cutoff)
        observed = float(n) if n >= 2 else math.inf
        if self.paused_until > cutoff and self.rate is not None:
            observed = math.inf
        rate = min(self.rate if self.rate is not None else math.inf, observed) * d
        if rate == math.inf:
            rate = self.min_rate
        rate = max(self.min_rate, rate)
        self._set_rate(rate)
        # Once the server has shown its limit, requests are spaced evenly: a banked burst
        # would go over it again.
        assert self.requests is not None
        self.requests.burst_s = min(self.settings.burst_s, 1 / rate)
        self.base_rate = rate
        self.last_decrease = now
        self.decreases += 1
        self.answers = self.refusals = 0

    def finish(self) -> list[RatePoint]:
        """The series with the last, partial interval closed."""
        self.series.close_interval(time.monotonic(), self.limit_rpm, self.slots)
        return list(self.series.points)
