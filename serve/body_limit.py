"""Bounds on request bodies, enforced while the bytes arrive, before anything parses them.

- Size: FastAPI reads a JSON body whole before pydantic's field bounds can refuse it, so without a
  cap a client could make the ingress buffer gigabytes to be told "prompt too long". Routes that
  carry their own, larger cap (the artifact upload) are exempt from it and count their bytes
  themselves.
- Time: every request holds one of the ingress's ongoing-request slots while its body arrives, so
  64 clients that send a few bytes and stop once stalled the whole API. Each chunk must arrive
  within `idle_s`, and the whole body within `total_s` (`upload_total_s` on exempt routes): 408.
- Nesting: Python's JSON reader recurses; a 64 KiB body of `[[[[…` raised RecursionError (a 500).
  JSON bodies nested deeper than `max_depth` are refused with a 422 before they are parsed. The
  check is one linear scan, run in a worker thread: the event loop serves every other request
  meanwhile (its first version backtracked quadratically on an unterminated string, docs/security.md).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# A string, its closing quote optional: an unterminated one runs to the end instead of failing, so
# the match never backtracks and every byte is read a bounded number of times.
_STRING = re.compile(rb'"(?:[^"\\]+|\\.)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]")
_STEP = np.full(256, -1, dtype=np.int32)
_STEP[list(b"[{")] = 1  # an opening bracket nests one level deeper, a closing one leaves it


def json_depth(body: bytes) -> int:
    """How deeply a JSON text nests arrays and objects (brackets inside strings do not count), in
    time linear in its length."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", body))
    return int(np.cumsum(_STEP[np.frombuffer(brackets, dtype=np.uint8)]).max(initial=0))


class BodyTimeout(HTTPException):
    def __init__(self, what: str) -> None:
        super().__init__(408, f"{what}; send the whole request body without pauses")


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over `limit` bytes (declared or chunked), 408 for a
    body that arrives too slowly, 422 for JSON nested deeper than `max_depth`."""

    def __init__(self, app: Callable, limit: int, exempt: tuple[tuple[str, str], ...] = (), idle_s: float = 10.0,
                 total_s: float = 60.0, upload_total_s: float = 600.0, max_depth: int = 32) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt  # exempt: (method, path suffix) pairs
        self.idle_s, self.total_s, self.upload_total_s, self.max_depth = idle_s, total_s, upload_total_s, max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        exempt = any(scope["method"] == m and scope["path"].endswith(p) for m, p in self.exempt)
        timed = self._timed(receive, self.upload_total_s if exempt else self.total_s)
        if exempt:  # the route reads (and counts) its own body; BodyTimeout reaches it as an HTTPException
            return await self.app(scope, timed, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, 413, f"request body is {int(declared):,} bytes; this endpoint "
                                                 f"accepts at most {self.limit:,} bytes")
        body, more = bytearray(), True
        while more:  # a chunked body declares no length: count while reading
            try:
                message = await timed()
            except BodyTimeout as err:
                return await self._refuse(send, 408, err.detail)
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send, 413, f"request body exceeds the limit; this endpoint accepts at "
                                                     f"most {self.limit:,} bytes")
        if body and await asyncio.to_thread(json_depth, bytes(body)) > self.max_depth:
            return await self._refuse(send, 422, f"JSON nests deeper than {self.max_depth} levels")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _timed(self, receive: Receive, total_s: float) -> Receive:
        """`receive` that raises BodyTimeout past `idle_s` for one message or `total_s` in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total_s

        async def timed() -> Message:
            left = deadline - loop.time()
            try:
                return await asyncio.wait_for(receive(), min(self.idle_s, max(left, 0.0)))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"no request body bytes for {self.idle_s:g} s" if left > self.idle_s
                                  else f"the request body took longer than {total_s:g} s") from None
        return timed

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
