"""Which concepts of the library a serve replica holds: a byte budget, least recently used out,
missing ones fetched on demand.

A replica cannot hold every concept of a large library, and need not: a request names its concepts
(resolved by the coordinator to exact artifacts, name and sha256), and the cache makes sure they
are in the replica's `ConceptBank` before the request joins a batch. Rules:
- a concept in use by a request in flight is pinned: never evicted under it (so the budget is
  exceeded only by the concepts of requests in flight, when they alone exceed it);
- a missing concept is fetched once however many requests want it: a later request joins the
  fetch in flight, so it never waits longer than its own fetch would take; fetches of different
  concepts run side by side, and a request whose concepts are all held waits for none of them;
- after a fetch, least recently used unpinned concepts leave until the held bytes fit the budget.

Keys are "name@sha256": a concept replaced under its name is another key, so no request is ever
served the old artifact for the new one. Nothing here knows about Ray: the replica passes `fetch`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Awaitable, Callable, Iterable

from blocklora.method.artifact import ConceptArtifact
from blocklora.method.residual import ConceptBank
from federation.protocol import Resolved


def cache_key(concept: Resolved) -> str:
    return f"{concept.name}@{concept.sha256}"


class ConceptCache:
    """`fetch(name, sha256)` returns an artifact's bytes (from the coordinator); `on_lookup(hit)` is
    told of every lookup (the replica's metrics)."""

    def __init__(self, bank: ConceptBank, budget_bytes: int, fetch: Callable[[str, str], Awaitable[bytes]],
                 on_lookup: Callable[[bool], None] = lambda hit: None) -> None:
        self.bank, self.fetch, self.on_lookup = bank, fetch, on_lookup
        self.held: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self.pins: dict[str, int] = {}
        self.fetching: dict[str, asyncio.Future[None]] = {}
        self.hits = self.misses = self.fetches = self.evictions = 0
        self.resize(budget_bytes)

    @property
    def bytes(self) -> int:
        return sum(self.held.values())

    async def acquire(self, concepts: Iterable[Resolved]) -> list[str]:
        """The bank keys of `concepts`, each held and pinned until `release`; fetched if missing."""
        keys, waits = [], []
        for c in concepts:
            key = cache_key(c)
            self.pins[key] = self.pins.get(key, 0) + 1
            keys.append(key)
            hit = key in self.held
            self.hits, self.misses = self.hits + hit, self.misses + (not hit)
            self.on_lookup(hit)
            if hit:
                self.held.move_to_end(key)
            else:
                if key not in self.fetching:  # a later request for it joins this fetch
                    self.fetching[key] = asyncio.ensure_future(self._load(key, c))
                    self.fetches += 1
                waits.append(self.fetching[key])
        try:
            await asyncio.gather(*waits)
        except BaseException:
            self.release(keys)
            raise
        return keys

    async def _load(self, key: str, concept: Resolved) -> None:
        try:
            art = ConceptArtifact.from_bytes(await self.fetch(concept.name, concept.sha256))
            self.bank.add(art, key)
            self.held[key] = self.bank.nbytes(key)
            self._evict()
        finally:
            del self.fetching[key]

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.pins[key] -= 1
            if not self.pins[key]:
                del self.pins[key]
        self._evict()

    def resize(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the concept cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self._evict()

    def _evict(self) -> None:
        total = self.bytes
        for key in list(self.held):
            if total <= self.budget:
                break
            if key not in self.pins:
                total -= self.held.pop(key)
                self.bank.remove(key)
                self.evictions += 1

    def stats(self) -> dict[str, float]:
        lookups = self.hits + self.misses
        return {"held": len(self.held), "bytes": self.bytes, "budget_bytes": self.budget, "hits": self.hits,
                "misses": self.misses, "fetches": self.fetches, "hit_rate": self.hits / lookups if lookups else 0.0,
                "evictions": self.evictions, "fetching": len(self.fetching)}
