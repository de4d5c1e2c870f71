"""Failed authentications counted so that guessing is slow, without one client locking out others.

Every credential this server hands out or is given carries at least 128 random bits (client tokens
and generated admin tokens 256; an API key must be 32 characters or more), so guessing one is
hopeless; the throttle is about cost and noise (each guess is a coordinator call), and about
slowing anyone who tries anyway (docs/security.md, "The throttle's design"). Three sliding-window
budgets of failures, checked before any work is done for a credential that has not worked here:

- per (source, credential): a client that keeps presenting one stale token is stopped on its own,
  after `per_credential` failures, without spending its neighbours' budget;
- per source: one address's guesses, `per_source` failures;
- overall: every source together, `overall` failures, so addresses that rotate (a botnet, or a
  proxy the operator should not have trusted) are bounded too.

A credential that authenticated here within `remember_s` is never throttled: behind one address
(the README's SSH tunnel puts every user at 127.0.0.1) a guesser exhausts the address's budget, and
the clients that were working keep working. The throttle holds only sha256 digests of credentials.

`client_address` decides what a "source" is: the peer, or, behind a proxy the operator names, the
address that proxy says it heard from (X-Forwarded-For read from the right).
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import time
from typing import Callable, Iterable

from fastapi import HTTPException

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def client_address(peer: str, forwarded_for: Iterable[str], proxies: Iterable[Network]) -> str:
    """Whom a request is counted against: `peer` (the connection's address), unless `peer` is one of
    `proxies`; then the nearest address in the X-Forwarded-For values that is not one of them (each
    proxy appends the address it heard from). Forwarded headers from anyone else are ignored."""
    proxies = list(proxies)

    def trusted(text: str) -> bool:
        addr = _address(text)
        return addr is not None and any(addr in net for net in proxies)
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    source = peer
    while trusted(source) and hops:
        source = hops.pop()
    return source[:64]  # a proxy passes on what it was sent: bound the key


def digest(credential: str) -> str:
    return hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()


class _Windows:
    """Failure times per key within `window_s`, for at most `max_keys` keys (least recent dropped)."""

    def __init__(self, window_s: float, max_keys: int, clock: Callable[[], float]) -> None:
        self.window_s, self.max_keys, self.clock = window_s, max_keys, clock
        self.times: collections.OrderedDict[object, collections.deque[float]] = collections.OrderedDict()

    def recent(self, key: object) -> collections.deque[float]:
        times = self.times.get(key, collections.deque())
        while times and times[0] <= self.clock() - self.window_s:
            times.popleft()
        return times

    def add(self, key: object) -> None:
        times = self.recent(key)
        times.append(self.clock())
        self.times[key] = times
        self.times.move_to_end(key)
        while len(self.times) > self.max_keys:
            self.times.popitem(last=False)


class GuessThrottle:
    """Budgets of failed authentications (module docstring); `check` before the work, then `failed`
    or `succeeded` with its outcome."""

    def __init__(self, per_credential: int = 5, per_source: int = 30, overall: int = 120, window_s: float = 60.0,
                 remember_s: float = 3600.0, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_credential, self.per_source, self.overall = per_credential, per_source, overall
        self.window_s, self.remember_s, self.max_keys, self.clock = window_s, remember_s, max_keys, clock
        self.failures = _Windows(window_s, max_keys, clock)  # keys: (source, digest prefix), source, None
        self.worked: collections.OrderedDict[str, float] = collections.OrderedDict()  # digest -> last success

    def check(self, source: str, credential: str) -> None:
        """429 with Retry-After if a budget is spent, unless `credential` worked here recently."""
        key = digest(credential)
        if self.clock() - self.worked.get(key, -self.remember_s) < self.remember_s:
            return
        for bucket, limit, what in (((source, key[:16]), self.per_credential, "with this token from this address"),
                                    (source, self.per_source, "from this address"),
                                    (None, self.overall, "from all addresses together")):
            times = self.failures.recent(bucket)
            if len(times) >= limit:
                retry = max(1, int(times[0] + self.window_s - self.clock()) + 1)
                raise HTTPException(429, f"too many failed authentications {what} ({len(times)} in "
                                         f"{self.window_s:.0f} s, the limit is {limit}); retry in {retry} s "
                                         "(a token that worked here in the last hour is not held back)",
                                    headers={"Retry-After": str(retry)})

    def failed(self, source: str, credential: str) -> None:
        key = digest(credential)
        self.worked.pop(key, None)
        for bucket in ((source, key[:16]), source, None):
            self.failures.add(bucket)

    def succeeded(self, credential: str) -> None:
        key = digest(credential)
        self.worked[key] = self.clock()
        self.worked.move_to_end(key)
        while len(self.worked) > self.max_keys:
            self.worked.popitem(last=False)
