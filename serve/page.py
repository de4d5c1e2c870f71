"""The page at `/`: plain static files shipped in this package (serve/page/), and the two JSON routes
only the page needs (the federation at a glance, and each live concept's thumbnail).

Plain HTML, CSS and JavaScript, no UI library: the ingress stays light (no torch, nothing to
download at install or at run time, no build step), every asset comes from this package, and the
Content-Security-Policy can forbid inline script and every other origin (docs/page.md says more).

The routes are a mixin of `serve.ingress.Ingress` on a router it includes: the methods use the
ingress's coordinator handle, generator handle, API-key check and live-set cache.
"""

# (No `from __future__ import annotations`: Serve's class-based views hand FastAPI these signatures.)

import asyncio
import functools
import time
from pathlib import Path

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from federation.protocol import FederationInfo, HeldSlot, LiveConcept
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
    total: int
    free: int
    held: int
    live: int


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
    """Everything the page shows of the federation, in one call."""

    version: int
    now: float  # the server's wall clock: "expires in 5 min" does not depend on the browser's
    base: Base
    slots: Slots
    api_key_required: bool  # /v1/generate (and thumbnails) want 'Authorization: Bearer <API key>'
    max_pixel_steps: int  # width x height x steps x num_images one request may cost
    max_artifact_bytes: int
    live: list[LiveCard]
    held: list[HeldCard]


class PageRoutes:
    """The page's JSON routes, mixed into the Ingress: they use its `coordinator` and `generator`
    handles, `api_key`, `max_pixel_steps`, `_check_api_key` and `_live`."""

    @functools.cached_property
    def thumbnails(self) -> Thumbnails:
        return Thumbnails(self._draw_thumbnail, THUMBNAIL_RETRY_S)

    async def _draw_thumbnail(self, name: str) -> bytes | None:
        drawn = await self.generator.thumbnail.remote(GenerateRequest(prompt=THUMBNAIL_PROMPT % name))
        return None if drawn is None else drawn.png(0)

    @router.get("/v1/federation", response_model=Overview)
    async def overview(self) -> Overview:
        """Version, base, slots, live concepts and held slots (with their training's progress)."""
        info: FederationInfo
        info, rows = await asyncio.gather(self.coordinator.info.remote(), self.coordinator.list_concepts.remote())
        return Overview(
            version=info.version, now=time.time(), api_key_required=self.api_key is not None,
            max_pixel_steps=self.max_pixel_steps, max_artifact_bytes=info.max_artifact_bytes,
            base=Base(spec=info.base_spec, fingerprint=info.base_fingerprint, resolution=info.resolution),
            slots=Slots(total=info.num_slots, free=info.free_slots, held=info.reserved, live=info.live),
            live=[LiveCard(**r.to_dict(), thumbnail=f"/v1/concepts/{r.name}/thumbnail?artifact={r.sha256[:16]}")
                  for r in rows if isinstance(r, LiveConcept)],
            held=[HeldCard(**r.to_dict()) for r in rows if isinstance(r, HeldSlot)])

    @router.get("/v1/concepts/{name}/thumbnail",
                responses={200: {"content": {"image/png": {}}, "description": "the concept's picture"},
                           202: {"description": "not drawn yet: it is drawn while no request waits; retry"},
                           404: {"description": "no live concept has this name"}})
    async def thumbnail(self, name: str, request: Request, authorization: str | None = Header(None)) -> Response:
        """The concept's picture (THUMBNAIL_PROMPT, default settings, seed 0), drawn once per artifact and
        only while the generator has no request waiting: asking never delays anyone's images."""
        self._check_api_key(request, authorization)
        version, live = await self._live()
        self.thumbnails.keep({c.sha256 for c in live.values()})
        if name not in live:
            raise HTTPException(404, f"no live concept named {name!r} (version {version})")
        png = self.thumbnails.get(name, live[name].sha256)
        if png is None:
            return JSONResponse({"detail": f"the thumbnail of {name!r} is drawn while no request waits; "
                                           f"retry in {THUMBNAIL_RETRY_S} s"},
                                status_code=202, headers={"Retry-After": str(THUMBNAIL_RETRY_S)})
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})
