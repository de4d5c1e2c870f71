"""The page at `/`: plain static files shipped in this package (serve/page/), and the JSON routes only
the page needs (the federation at a glance, the live concepts as cards one page at a time, and each
live concept's thumbnail).

Plain HTML, CSS and JavaScript, no UI library: the ingress stays light (no torch, nothing to
download at install or at run time, no build step), every asset comes from this package, and the
Content-Security-Policy can forbid inline script and every other origin (docs/page.md says more).

A federation is a library that may hold thousands of concepts (docs/library.md): the overview
carries counts and the held slots, never every concept; cards come a page at a time, in the
library's name order, through the coordinator's own paging.

The routes are a mixin of `serve.ingress.Ingress` on a router it includes: the methods use the
ingress's coordinator handle (through its `_call`, which words refusals as HTTP errors), generator
handle and API-key check.
"""

# (No `from __future__ import annotations`: Serve's class-based views hand FastAPI these signatures.)

import asyncio
import functools
import time
from pathlib import Path

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from federation.errors import UnknownConcept
from federation.protocol import ConceptPage, ConceptQuery, FederationInfo, Plan
from serve.replies import ConceptUnavailable
from serve.schemas import GenerateRequest
from serve.thumbnails import Thumbnails

ASSETS = Path(__file__).with_name("page")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
FILES = {p.name: (p.read_bytes(), TYPES[p.suffix]) for p in sorted(ASSETS.iterdir()) if p.suffix in TYPES}
# the page's own files and this API only: no inline script or style, no other origin, no framing
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
THUMBNAIL_PROMPT = "a large {%s} on a white background"  # % name: a plain product shot of the concept
THUMBNAIL_RETRY_S = 2  # Retry-After while a thumbnail waits for an idle replica
MAX_CARDS = 100  # cards one /v1/federation/concepts page may ask for (the page asks for fewer)
HELD_SHOWN = 50  # reservations the overview lists (in name order; `held_total` counts them all)

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return asset("index.html")


@router.get("/page/{name}", include_in_schema=False)
def asset(name: str) -> Response:
    if name not in FILES:
        raise HTTPException(404, f"the page has no file {name!r}")
    body, media_type = FILES[name]
    return Response(body, media_type=media_type, headers=HEADERS)


class Base(BaseModel):
    spec: str
    fingerprint: str
    resolution: int


class Slots(BaseModel):
    total: int  # K: how many concepts one picture can merge
    free: int  # slots no live concept or reservation uses
    live: int  # live concepts (several may share a slot)
    held: int  # reservations


class LiveCard(BaseModel):
    name: str
    slot: int
    triggers: list[str]
    class_word: str
    owner: str  # the owner's display name (never a token)
    version: int  # the federation version at which it went live
    live_at: float  # wall-clock seconds; 0 if it went live before such times were recorded
    thumbnail: str  # URL of its picture (changes with the artifact)


class Progress(BaseModel):
    step: int
    steps: int
    eta_s: float | None
    at: float


class HeldCard(BaseModel):
    name: str
    slot: int
    class_word: str
    owner: str
    reserved_at: float
    expires_at: float
    progress: Progress | None


class Overview(BaseModel):
    """The federation at a glance, in one call whatever the library's size: no list of concepts."""

    version: int
    now: float  # the server's wall clock: "expires in 5 min" does not depend on the browser's
    base: Base
    slots: Slots
    collections: int
    api_key_required: bool  # /v1/generate (and thumbnails) want 'Authorization: Bearer <API key>'
    max_pixel_steps: int  # width x height x steps x num_images one request may cost
    max_artifact_bytes: int
    held: list[HeldCard]  # the first HELD_SHOWN reservations in name order
    held_total: int


class Cards(BaseModel):
    """One page of live concepts as cards, in name order."""

    version: int
    now: float
    total: int = Field(description="live concepts matching the filters, over every page")
    cards: list[LiveCard]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last one")


class PageRoutes:
    """The page's JSON routes, mixed into the Ingress: they use its `coordinator` and `generator`
    handles, `api_key`, `max_pixel_steps`, `_call` and `_check_api_key`."""

    @functools.cached_property
    def thumbnails(self) -> Thumbnails:
        return Thumbnails(self._draw_thumbnail, THUMBNAIL_RETRY_S)

    async def _draw_thumbnail(self, name: str, sha256: str) -> bytes | None:
        request = GenerateRequest(prompt=THUMBNAIL_PROMPT % name)
        try:
            plan: Plan = await self.coordinator.resolve.remote(request.subset())
        except UnknownConcept:  # removed since it was asked for
            raise ConceptUnavailable([name], -1) from None
        if plan.concepts[0].sha256 != sha256:  # replaced since it was asked for: the new one has its own
            raise ConceptUnavailable([name], plan.version)
        drawn = await self.generator.thumbnail.remote(request, plan)
        return None if drawn is None else await asyncio.to_thread(drawn.png, 0)  # off the event loop

    @router.get("/v1/federation", response_model=Overview)
    async def overview(self) -> Overview:
        """Version, base, slot use, counts, and the held slots (with their training's progress)."""
        info: FederationInfo
        held: ConceptPage
        info, held = await asyncio.gather(self.coordinator.info.remote(), self._call(
            "list_concepts", ConceptQuery(limit=HELD_SHOWN, status="reserved")))
        return Overview(
            version=info.version, now=time.time(), api_key_required=self.api_key is not None,
            max_pixel_steps=self.max_pixel_steps, max_artifact_bytes=info.max_artifact_bytes,
            base=Base(spec=info.base_spec, fingerprint=info.base_fingerprint, resolution=info.resolution),
            slots=Slots(total=info.num_slots, free=info.slot_use.count(0), live=info.live, held=info.reserved),
            collections=info.collections, held=[HeldCard(**r.to_dict()) for r in held.items],
            held_total=held.total)

    @router.get("/v1/federation/concepts", response_model=Cards)
    async def cards(self, limit: int = Query(24, ge=1, le=MAX_CARDS), cursor: str | None = Query(None, max_length=100),
                    prefix: str | None = Query(None, max_length=64),
                    collection: str | None = Query(None, max_length=64)) -> Cards:
        """One page of live concepts as the page's cards (owner's display name, when it went live, the
        URL of its thumbnail), in name order; `prefix` and `collection` narrow it."""
        page: ConceptPage = await self._call("list_concepts", ConceptQuery(
            limit, cursor, prefix or None, collection=collection or None, status="live"))
        cards = [LiveCard(**r.to_dict(), thumbnail=f"/v1/concepts/{r.name}/thumbnail?artifact={r.sha256[:16]}")
                 for r in page.items]
        return Cards(version=page.version, now=time.time(), total=page.total, next_cursor=page.next_cursor,
                     cards=cards)

    @router.get("/v1/concepts/{name}/thumbnail",
                responses={200: {"content": {"image/png": {}}, "description": "the concept's picture"},
                           202: {"description": "not drawn yet: it is drawn while no request waits; retry"},
                           404: {"description": "no live concept has this name"}})
    async def thumbnail(self, name: str, request: Request, authorization: str | None = Header(None)) -> Response:
        """The concept's picture (THUMBNAIL_PROMPT, default settings, seed 0), drawn once per artifact and
        only while the generator has no request waiting: asking never delays anyone's images."""
        self._check_api_key(request, authorization)
        plan: Plan = await self._call("resolve", {name: 1.0})  # 404 naming it when it is not live
        png = self.thumbnails.get(name, plan.concepts[0].sha256)
        if png is None:
            return JSONResponse({"detail": f"the thumbnail of {name!r} is drawn while no request waits; "
                                           f"retry in {THUMBNAIL_RETRY_S} s"},
                                status_code=202, headers={"Retry-After": str(THUMBNAIL_RETRY_S)})
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})
