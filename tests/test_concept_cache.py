"""A replica's concept cache (serve/concept_cache.py) over a real ConceptBank, no Ray: the byte
budget with least recently used out, pins, one fetch per concept however many wait for it, and no
request waiting on another's fetch."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from blocklora.config import AdapterConfig
from blocklora.method.residual import ConceptBank
from blocklora.pipeline.base import load_base
from core_helpers import make_artifact
from federation.protocol import Resolved
from serve.concept_cache import ConceptCache

ADAPTER = AdapterConfig(rank=2, num_slots=4)


@pytest.fixture
def library():
    """A fresh base for the bank to wrap, and six concepts' artifacts (two slots hold two)."""
    base = load_base("tiny")
    arts = {f"c{i}": make_artifact(base, ADAPTER, f"c{i}", i % 4, seed=i).to_bytes() for i in range(6)}
    return base, arts


def plan(library, *names) -> list[Resolved]:
    return [Resolved(n, 0, hashlib.sha256(library[1][n]).hexdigest(), "", 1.0) for n in names]


class Store:
    """Where the cache fetches from: the artifacts' bytes, each fetch counted, optionally held until released."""

    def __init__(self, arts: dict[str, bytes]) -> None:
        self.arts, self.fetched, self.gates = arts, [], {}

    async def fetch(self, name: str, sha256: str) -> bytes:
        self.fetched.append(name)
        if name in self.gates:
            await self.gates[name].wait()
        return self.arts[name]


def test_budget_least_recently_used_out_and_pins_hold(library):
    base, arts = library
    bank = ConceptBank(base, ADAPTER)
    store = Store(arts)
    one = len(arts["c0"])  # a concept's factors are about its file's size
    cache = ConceptCache(bank, 0, store.fetch)
    size = None

    async def run():
        nonlocal size
        keys = await cache.acquire(plan(library, "c0"))
        size = cache.bytes
        cache.resize(2 * size)  # room for two
        cache.release(keys)
        for name in ("c1", "c0", "c2"):  # c0 is used again before c2 arrives: c1 is the least recent
            cache.release(await cache.acquire(plan(library, name)))
        assert sorted(bank.live) == sorted(f"{n}@{p.sha256}" for n, p in zip(("c0", "c2"), plan(library, "c0", "c2")))
        pinned = await cache.acquire(plan(library, "c3", "c4", "c5"))  # more than the budget, all in use
        assert len(cache.held) == 3 and cache.bytes > cache.budget  # pinned: none evicted under its request
        cache.release(pinned)
        assert len(cache.held) == 2 and cache.bytes <= cache.budget

    asyncio.run(run())
    assert 0.5 * one < size < 2 * one
    assert store.fetched == ["c0", "c1", "c2", "c3", "c4", "c5"] and cache.evictions == 4
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 6


def test_one_fetch_per_concept_and_nobody_waits_on_another_fetch(library):
    base, arts = library
    cache = ConceptCache(ConceptBank(base, ADAPTER), 10**9, (store := Store(arts)).fetch)

    async def run():
        cache.release(await cache.acquire(plan(library, "c0")))  # held
        store.gates["c1"] = asyncio.Event()
        slow = [asyncio.create_task(cache.acquire(plan(library, "c1"))) for _ in range(3)]  # three want c1
        await asyncio.sleep(0.01)
        fast = await asyncio.wait_for(cache.acquire(plan(library, "c0")), 1)  # c0 does not wait for c1
        assert not any(t.done() for t in slow)
        store.gates["c1"].set()
        for keys in await asyncio.gather(*slow):
            cache.release(keys)
        cache.release(fast)

    asyncio.run(run())
    assert store.fetched == ["c0", "c1"] and cache.fetches == 2 and cache.pins == {}


def test_a_failed_fetch_pins_nothing(library):
    base, arts = library

    async def gone(name: str, sha256: str) -> bytes:
        raise KeyError(name)

    cache = ConceptCache(ConceptBank(base, ADAPTER), 10**9, gone)
    with pytest.raises(KeyError):
        asyncio.run(cache.acquire(plan(library, "c0")))
    assert cache.pins == {} and cache.fetching == {} and cache.held == {}
