"""Upload bodies on their way to the coordinator, with the bytes they hold in the ingress bounded.

An upload's body is written to a temporary file as it arrives, so a slow or large body costs disk,
not memory, for as long as it takes to arrive; at most `ARRIVING` bodies are spooled at once (disk
bounded too: more get 503 with Retry-After), one per token, so a client that trickles its bytes
holds one of the places, not all of them. Only then are the artifact's bytes read into memory, by
at most `IN_MEMORY` uploads at once, for the coordinator call. Reading every body whole into a
growing buffer, as before, made the ingress's memory grow with the uploads in flight and keep much of
it (docs/security.md, issue #40.8).
"""

from __future__ import annotations

import asyncio
import mmap
import tempfile
from contextlib import asynccontextmanager
from typing import IO, AsyncIterator

from fastapi import HTTPException, Request

from serve.multipart import MalformedMultipart, file_part

MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries and part headers around the artifact
ARRIVING = 4  # upload bodies spooled at once: at most 4 x (the federation's artifact limit) on disk
IN_MEMORY = 1  # artifacts held in the ingress at once: the coordinator takes one call at a time anyway
RETRY_AFTER_S = 5


def _artifact(spool: IO[bytes], size: int, content_type: str) -> bytes:
    """The artifact's bytes from a spooled body: all of it, or its multipart file part; one
    allocation of the artifact's own size."""
    if not content_type.startswith("multipart/form-data"):
        spool.seek(0)
        return spool.read(size)
    if size == 0:
        raise MalformedMultipart("the multipart body is empty")
    with mmap.mmap(spool.fileno(), size, access=mmap.ACCESS_READ) as view:
        start, end = file_part(view, content_type)
        return view[start:end]


class Uploads:
    """Where upload bodies wait: `artifact(request)` spools one, then lends its artifact's bytes."""

    def __init__(self, max_bytes: int, arriving: int = ARRIVING, in_memory: int = IN_MEMORY) -> None:
        self.max_bytes, self.arriving = max_bytes, arriving
        self.senders: set[str] = set()  # who has a body arriving: a digest of its token
        self.in_memory = asyncio.Semaphore(in_memory)

    @asynccontextmanager
    async def artifact(self, request: Request, sender: str) -> AsyncIterator[bytes]:
        """The artifact's bytes of `request` (its raw body, or the multipart file part), held only
        inside the `async with` block: 413 past the federation's limit (declared, or counted while a
        chunked body arrives), 503 while ARRIVING bodies are spooled already, 429 while `sender` has
        another one arriving, 400 for a malformed multipart body or an empty artifact."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise HTTPException(413, f"artifact is {int(declared):,} bytes; this federation accepts at most "
                                     f"{self.max_bytes:,}")
        if sender in self.senders:
            raise HTTPException(429, "another upload with this token is still arriving; send one at a time",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        if len(self.senders) >= self.arriving:
            raise HTTPException(503, f"{self.arriving} uploads are arriving already; retry in {RETRY_AFTER_S} s",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        self.senders.add(sender)
        try:
            with tempfile.TemporaryFile(prefix="blocklora-upload-") as spool:
                size = 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_bytes + MULTIPART_SLACK:
                        raise HTTPException(413, f"upload exceeds {self.max_bytes:,} bytes, the most this "
                                                 "federation accepts")
                    spool.write(chunk)
                spool.flush()
                async with self.in_memory:
                    try:
                        data = await asyncio.to_thread(_artifact, spool, size, request.headers.get("content-type", ""))
                    except MalformedMultipart as err:
                        raise HTTPException(400, str(err)) from None
                    if not data:
                        raise HTTPException(400, "empty upload: send the artifact's bytes (ConceptArtifact.save file)")
                    yield data
        finally:
            self.senders.discard(sender)
