"""A cap on request bodies, enforced while the bytes arrive, before anything parses them.

FastAPI reads a JSON body whole before pydantic's field bounds can refuse it, so without this a
client could make the ingress buffer gigabytes to be told "prompt too long". Routes that carry
their own, larger cap (the artifact upload) are exempt and count their bytes themselves.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over `limit` bytes, declared or chunked."""

    def __init__(self, app: Callable, limit: int, exempt: tuple[tuple[str, str], ...] = ()) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt  # exempt: (method, path suffix) pairs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or any(scope["method"] == m and scope["path"].endswith(p) for m, p in self.exempt):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, f"request body is {int(declared):,} bytes")
        body, more = bytearray(), True
        while more:  # a chunked body declares no length: count while reading
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send, "request body exceeds the limit")
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, what: str) -> None:
        detail = json.dumps({"detail": f"{what}; this endpoint accepts at most {self.limit:,} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(detail)).encode())]})
        await send({"type": "http.response.body", "body": detail})
