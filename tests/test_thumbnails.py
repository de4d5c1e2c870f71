"""The ingress's thumbnail cache without Ray: `draw` is a plain async function standing for the
generator replica (the real one is driven in tests/test_page.py). Each artifact is drawn once, one
at a time, by the digest it was asked for; a replica that gives way is asked again; past the bound the
least recently asked-for pictures are forgotten."""

from __future__ import annotations

import asyncio

from serve.replies import ConceptUnavailable
from serve.thumbnails import Thumbnails


def test_drawn_once_retried_when_the_replica_gives_way_and_bounded():
    calls: list[tuple[str, str]] = []
    busy = {"a": 2}  # the replica gives way twice while drawing a

    async def draw(name: str, sha256: str) -> bytes | None:
        calls.append((name, sha256))
        await asyncio.sleep(0)
        if busy.get(name):
            busy[name] -= 1
            return None
        if name == "gone":
            raise ConceptUnavailable([name], 3)
        return f"png of {name}".encode()

    async def scenario() -> None:
        cache = Thumbnails(draw, retry_s=0.0, max_pictures=2)
        assert [cache.get(n, f"sha-{n}") for n in ("a", "b", "gone")] == [None, None, None]
        assert cache.get("a", "sha-a") is None  # asked again while queued: not queued twice
        await cache.task
        assert calls == [(n, f"sha-{n}") for n in ("a", "a", "a", "b", "gone")]
        assert cache.get("a", "sha-a") == b"png of a" and cache.get("b", "sha-b") == b"png of b"
        assert cache.get("gone", "sha-gone") is None  # removed meanwhile: asked again, queued again
        await cache.task
        assert cache.wanted == {}
        for n in ("c", "d"):
            cache.get(n, f"sha-{n}")
            await cache.task
        assert list(cache.pictures) == ["sha-c", "sha-d"]  # a and b, least recently asked for, made room

    asyncio.run(scenario())
