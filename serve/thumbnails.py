"""One picture per live concept for the page's cards: drawn once per artifact, one at a time, in
the background, and only when the generator replica has nothing else to do.

The ingress asks `get` on every thumbnail request; the first ask for an artifact queues it and
answers None ("being drawn"). A single background task draws the queue through `draw`, which gives
way (None) while any generate call waits on the replica; it then tries again after `retry_s`.
Pictures are kept by the artifact's sha256, so a concept re-uploaded under its name gets a new one
(the ingress asks for the digest the coordinator resolves the name to: a removed concept's picture is
never served, and ages out). Past `max_pictures` the least recently asked for goes (it is drawn again
if asked again): a 512 px picture is a few hundred kB, and a library may hold thousands of concepts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Awaitable, Callable

from serve.replies import ConceptUnavailable

log = logging.getLogger(__name__)


class Thumbnails:
    """`draw(name, sha256)`: the picture of that artifact as PNG bytes, or None if the replica was busy;
    ConceptUnavailable if the name no longer holds that artifact."""

    def __init__(self, draw: Callable[[str, str], Awaitable[bytes | None]], retry_s: float = 2.0,
                 max_pictures: int = 256) -> None:
        self.draw, self.retry_s, self.max_pictures = draw, retry_s, max_pictures
        self.pictures: collections.OrderedDict[str, bytes] = collections.OrderedDict()  # sha256 -> PNG, LRU first
        self.wanted: dict[str, str] = {}  # artifact sha256 -> concept name, in the order first asked
        self.task: asyncio.Task | None = None

    def get(self, name: str, sha256: str) -> bytes | None:
        """The picture of `name`'s artifact, or None while it is still to be drawn (this starts it)."""
        if sha256 in self.pictures:
            self.pictures.move_to_end(sha256)
            return self.pictures[sha256]
        self.wanted.setdefault(sha256, name)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._work())
        return None

    async def _work(self) -> None:
        while self.wanted:
            sha, name = next(iter(self.wanted.items()))
            try:
                png = await self.draw(name, sha)
            except ConceptUnavailable:  # removed or replaced meanwhile
                self.wanted.pop(sha, None)
                continue
            except Exception:  # noqa: BLE001 - a failed picture must not stop the others; the next ask retries
                log.exception("thumbnail of %r failed", name)
                self.wanted.pop(sha, None)
                continue
            if png is None:  # the replica had requests to serve: they go first
                await asyncio.sleep(self.retry_s)
            else:
                self.wanted.pop(sha, None)
                self.pictures[sha] = png
                while len(self.pictures) > self.max_pictures:
                    self.pictures.popitem(last=False)
