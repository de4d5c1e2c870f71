"""Failed authentications counted per source address, so tokens cannot be guessed at wire speed.

A client token carries 256 random bits, so guessing is hopeless anyway; the throttle is about cost
and noise: without it one source could make thousands of coordinator calls a minute with bogus
tokens (66/s were measured) and fill the logs. After `limit` failures within `window_s` a source
gets 429 with Retry-After for every token-bearing call until its oldest failure ages out; the
coordinator is not called at all. Successful calls are never counted.
"""

from __future__ import annotations

import collections
import time
from typing import Callable

from fastapi import HTTPException


class FailureThrottle:
    """Sliding-window count of authentication failures per source (an IP address)."""

    def __init__(self, limit: int = 20, window_s: float = 60.0, max_sources: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.max_sources, self.clock = limit, window_s, max_sources, clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def check(self, source: str) -> None:
        """Raise 429 if `source` has used up its failures; call before doing any work for it."""
        times = self._recent(source) if source in self._failures else ()
        if len(times) >= self.limit:
            retry = max(1, int(times[0] + self.window_s - self.clock()) + 1)
            raise HTTPException(429, f"too many failed authentications from this address ({len(times)} in "
                                     f"{self.window_s:.0f} s, the limit is {self.limit}); retry in {retry} s",
                                headers={"Retry-After": str(retry)})

    def failed(self, source: str) -> None:
        self._recent(source).append(self.clock())
        self._failures.move_to_end(source)
        while len(self._failures) > self.max_sources:  # bounded memory under a spray of addresses
            self._failures.popitem(last=False)

    def _recent(self, source: str) -> collections.deque[float]:
        times = self._failures.setdefault(source, collections.deque())
        while times and times[0] <= self.clock() - self.window_s:
            times.popleft()
        return times
