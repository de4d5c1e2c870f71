"""The HTTP front: validation, the concept check against the coordinator, PNG encoding, admin calls.

Every /v1/generate first has the coordinator resolve its concepts (one small actor call: names ->
slots and artifact digests, refused with 404 when one is not live and 409 when two share a slot),
so a removed concept is refused at once, and the replica is told exactly which artifacts to draw
with. The ingress keeps nothing of the library. Calls that change something go to the coordinator
with the caller's bearer token and a request id (the client's `Idempotency-Key`, or one drawn
here): the coordinator decides who may do what and answers a retry as it answered the first call;
the ingress holds no secret of its own.

(No `from __future__ import annotations` here: Serve's class-based views hand FastAPI the route
signatures, and string annotations would turn the request body into a query parameter.)
"""


import asyncio
import base64
import dataclasses
import ipaddress
import json
import re
import secrets
import uuid
from typing import Literal

import ray
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from federation import errors
from federation.auth import new_invitation_code
from federation.coordinator import START_WAIT_S, get as coordinator_named
from federation.protocol import ConceptQuery, FederationInfo, Plan
from federation.records import DEFAULT
from serve.body_limit import BodyLimit
from serve.page import PageRoutes, router as page_router
from serve.replies import ConceptUnavailable
from serve.schemas import (
    MAX_BODY_BYTES,
    MAX_PIXEL_STEPS,
    CollectionBody,
    Concept,
    Concepts,
    GenerateRequest,
    Images,
    InvitationBody,
)
from serve.throttle import GuessThrottle, client_address, digest
from serve.uploads import Uploads

app = FastAPI(title="blocklora", summary="Stable Diffusion with any live subset of a federation's concepts",
              docs_url="/v1/docs", openapi_url="/v1/openapi.json", redoc_url=None)
app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, exempt=(("POST", "/v1/concepts"),))  # uploads cap themselves
app.include_router(page_router)  # the page at / and its JSON routes (serve/page.py)


def _json(status: int, content, headers: dict | None = None) -> Response:
    """A JSON response that any input can be echoed into: ASCII-only (a lone UTF-16 surrogate from
    the request becomes a \\u escape instead of failing to encode), NaN/Infinity as strings."""
    text = json.dumps(json.loads(json.dumps(content, default=str), parse_constant=str), ensure_ascii=True)
    return Response(text, status_code=status, headers=headers, media_type="application/json")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    """Malformed JSON is a 400 (the body could not be read at all); broken bounds stay a 422."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _json(400, {"detail": f"request body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}"})
    return _json(422, {"detail": errors})


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Every refusal through `_json`: details may quote names and prompts the client sent."""
    return _json(exc.status_code, {"detail": exc.detail}, exc.headers)


# federation errors -> HTTP status; the coordinator's message is passed through as the detail
STATUS = ((errors.Unauthorized, 403), (errors.UnknownConcept, 404), (errors.ArtifactRejected, 422),
          (errors.ReservationError, 409), (errors.SlotUnavailable, 409), (errors.SlotClash, 409),
          (errors.StateUnavailable, 503), (errors.FederationError, 400))
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")


def _request_id(key: str | None) -> str:
    """The request id of a mutation: the client's Idempotency-Key (its retry then gets the first
    answer), or a fresh one (Ray's own retries of the call still carry it)."""
    if key is None:
        return uuid.uuid4().hex
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise HTTPException(400, "Idempotency-Key must be 8-64 ASCII letters, digits, '-' or '_'")
    return key


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def _message(err: Exception) -> str:
    """The remote error's own message: str() of Ray's wrapper would add the remote traceback
    (file paths, code lines) to what an HTTP client sees."""
    return str(getattr(err, "cause", None) or err)


# many ongoing requests: each costs the ingress only memory, and slow bodies time out (BodyLimit)
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(app)
class Ingress(PageRoutes):
    """`api_key` None: /v1/generate and /v1/lora are open; otherwise they need 'Authorization: Bearer <api_key>'.
    `max_pixel_steps`: the most one request may cost (`GenerateRequest.cost`: width x height x steps x
    images, weighted above the base's native size)."""

    def __init__(self, generator: DeploymentHandle, coordinator: str, namespace: str,
                 api_key: str | None = None, max_pixel_steps: int = MAX_PIXEL_STEPS,
                 trusted_proxies: tuple[str, ...] = ()) -> None:
        self.generator, self.api_key, self.max_pixel_steps = generator, api_key, max_pixel_steps
        self.proxies = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        self.coordinator = coordinator_named(coordinator, namespace, wait_s=START_WAIT_S)
        info: FederationInfo = ray.get(self.coordinator.info.remote())
        self.resolution, self.uploads = info.resolution, Uploads(info.max_artifact_bytes)
        self.throttle = GuessThrottle()

    def _source(self, request: Request) -> str:
        """The address failed authentications are counted against (serve/throttle.py)."""
        return client_address(request.client.host if request.client else "unknown",
                              request.headers.getlist("x-forwarded-for"), self.proxies)

    def _check_api_key(self, request: Request, authorization: str | None) -> None:
        if self.api_key is not None:
            key, source = _bearer(authorization), self._source(request)
            self.throttle.check(source, key)
            if not secrets.compare_digest(key.encode("utf-8", "surrogatepass"), self.api_key.encode()):
                self.throttle.failed(source, key)
                raise HTTPException(403, "API key not accepted")
            self.throttle.succeeded(key)

    async def _authenticate(self, request: Request, token: str) -> None:
        """`token` checked by the coordinator (`whoami`), under the throttle: refused unheard while
        a budget is spent (unless it worked here lately), an Unauthorized answer counted."""
        source = self._source(request)
        self.throttle.check(source, token)
        try:
            await self.coordinator.whoami.remote(token)
        except errors.Unauthorized as err:
            self.throttle.failed(source, token)
            raise HTTPException(403, _message(err)) from None
        self.throttle.succeeded(token)

    async def _call(self, method: str, *args):
        """A coordinator call; its refusal as the HTTP status of `STATUS`, with its message."""
        try:
            return await getattr(self.coordinator, method).remote(*args)
        except errors.FederationError as err:
            raise HTTPException(next(s for cls, s in STATUS if isinstance(err, cls)), _message(err)) from None

    async def _as(self, request: Request, authorization: str | None, method: str, *args):
        """A coordinator call made with the caller's bearer token, once `_authenticate` let it through."""
        token = _bearer(authorization)
        await self._authenticate(request, token)
        return await self._call(method, token, *args)

    @app.post("/v1/generate", response_model=Images,
              responses={200: {"content": {"image/png": {}},
                               "description": "image/png for one image (version in X-BlockLoRA-Version), "
                                              "JSON with base64 PNGs for several"},
                         404: {"description": "a named concept is not live"}})
    async def generate(self, req: GenerateRequest, request: Request,
                       authorization: str | None = Header(None)) -> Response:
        self._check_api_key(request, authorization)
        cost = req.cost(self.resolution)
        if cost > self.max_pixel_steps:
            raise HTTPException(422, f"request costs {cost:,} pixel-steps (width x height x steps x num_images, "
                                     f"each image-step weighted by how many {self.resolution}x{self.resolution} "
                                     "images, the base's native size, it holds: attention is quadratic in pixels); "
                                     f"this server allows at most {self.max_pixel_steps:,} per request "
                                     "(max_pixel_steps): use fewer steps, images or pixels")
        plan: Plan = await self._call("resolve", req.subset(), req.collection)
        try:
            out = await self.generator.generate.remote(req, plan)  # Serve cancels it if the client goes away
        except ConceptUnavailable as err:  # removed between our check and the replica's sync
            raise HTTPException(404, _message(err)) from None
        pngs = await asyncio.to_thread(lambda: [out.png(j) for j in range(len(out.seeds))])  # off the event loop
        if req.num_images == 1:
            return Response(pngs[0], media_type="image/png",
                            headers={"X-BlockLoRA-Version": str(out.version), "X-BlockLoRA-Seed": str(out.seeds[0])})
        return JSONResponse(Images(version=out.version, seeds=out.seeds,
                                   images=[base64.b64encode(p).decode() for p in pngs]).model_dump())

    @app.get("/v1/concepts", response_model=Concepts)
    async def concepts(self, limit: int = Query(100, ge=1, le=1000), cursor: str | None = Query(None, max_length=100),
                       prefix: str | None = Query(None, max_length=64), owner: str | None = Query(None, max_length=64),
                       class_word: str | None = Query(None, max_length=64), slot: int | None = Query(None, ge=0),
                       collection: str | None = Query(None, max_length=64),
                       status: Literal["live", "reserved", "any"] = "live") -> Concepts:
        """One page of the library in name order; `next_cursor` asks for the next one."""
        page = await self._call("list_concepts", ConceptQuery(limit, cursor, prefix, owner, class_word, slot,
                                                              collection, status))
        return Concepts(version=page.version, total=page.total, next_cursor=page.next_cursor,
                        concepts=[Concept(**c.to_dict(), status=c.status) for c in page.items])

    @app.get("/v1/mergeable")
    async def mergeable(self, concepts: str = Query(max_length=64 * 65, description="names, comma-separated")) -> dict:
        """Can these concepts be merged into one picture? If not, which pairs share a slot, and
        which names are not live."""
        return (await self._call("mergeable", tuple(n for n in concepts.split(",") if n))).to_dict()

    @app.get("/v1/collections")
    async def collections(self) -> dict:
        return {"collections": [c.to_dict() for c in await self._call("list_collections")]}

    @app.get("/v1/collections/{name}")
    async def collection(self, name: str) -> dict:
        return (await self._call("collection", name)).to_dict()

    @app.put("/v1/collections/{name}")
    async def put_collection(self, name: str, body: CollectionBody, request: Request,
                             authorization: str | None = Header(None),
                             idempotency_key: str | None = Header(None)) -> dict:
        """Create a collection or set its members (its owner or the admin); the coordinator keeps
        its merged residual by the members that come and go."""
        return (await self._as(request, authorization, "put_collection", name, tuple(body.members),
                               _request_id(idempotency_key))).to_dict()

    @app.delete("/v1/collections/{name}")
    async def delete_collection(self, name: str, request: Request, authorization: str | None = Header(None),
                                idempotency_key: str | None = Header(None)) -> dict:
        return (await self._as(request, authorization, "delete_collection", name,
                               _request_id(idempotency_key))).to_dict()

    @app.post("/v1/invitations", status_code=201)
    async def invite(self, body: InvitationBody, request: Request, authorization: str | None = Header(None)) -> dict:
        """The admin invites a person: the code (shown this once) registers their first client."""
        return (await self._as(request, authorization, "invite", body.name, new_invitation_code(), body.quota,
                               body.uses)).to_dict()

    @app.get("/v1/lora", responses={200: {"content": {"application/octet-stream": {}},
                                          "description": "pytorch_lora_weights.safetensors of the live set "
                                                         "(version in X-BlockLoRA-Version)"},
                                    404: {"description": "no concept is live"}})
    async def lora(self, request: Request, rule: Literal["sum", "mean"] = "sum",
                   collection: str = Query(DEFAULT, max_length=64),
                   authorization: str | None = Header(None)) -> Response:
        """A collection (default: the default one, today's live set) as ONE standard LoRA file, built
        from the coordinator's merged factors: `pipe.load_lora_weights(folder)` gives W0 + Σ α dW,
        α = 1 ("sum") or 1/|S| ("mean"). Trigger embeddings are not in it (diffusers loads those
        with `load_textual_inversion`)."""
        self._check_api_key(request, authorization)
        version, data = await self._call("merged_lora", rule, collection)
        return Response(data, media_type="application/octet-stream", headers={
            "X-BlockLoRA-Version": str(version),
            "Content-Disposition": 'attachment; filename="pytorch_lora_weights.safetensors"'})

    @app.get("/v1/healthz")
    async def healthz(self) -> dict:
        """Coordinator reachable and a generator replica up (it loads the base once; a busy replica
        answers at once) with its concept cache, denoising steps and abandoned loops so far, and the
        records the coordinator set aside when it loaded its state (federation/manifest.py)."""
        replica, info = await self.generator.status.remote(), await self.coordinator.info.remote()
        return {"status": "ok", "version": info.version, "live": info.live, "collections": info.collections,
                "slot_use": list(info.slot_use), "replica_busy": replica["busy"], "replica_steps": replica["steps"],
                "replica_cancelled_loops": replica["cancelled_loops"], "replica_cache": replica["cache"],
                "quarantined": [dataclasses.asdict(q) for q in info.quarantined[:20]],
                "quarantined_count": len(info.quarantined)}

    @app.post("/v1/concepts", status_code=201)
    async def upload(self, request: Request, authorization: str | None = Header(None),
                     idempotency_key: str | None = Header(None)) -> dict:
        """Submit an artifact (raw body, or multipart field 'artifact') with the token of the client
        that reserved its slot; the coordinator validates it and makes it live."""
        token = _bearer(authorization)
        await self._authenticate(request, token)  # before a byte of the body is read
        async with self.uploads.artifact(request, digest(token)) as data:  # spooled to disk while it arrives
            return (await self._call("submit", token, data, _request_id(idempotency_key))).to_dict()

    @app.delete("/v1/concepts/{name}")
    async def remove(self, name: str, request: Request, authorization: str | None = Header(None),
                     idempotency_key: str | None = Header(None)) -> dict:
        """Take a live concept out (owner or admin token): it leaves every collection, and
        /v1/generate refuses it at once."""
        return (await self._as(request, authorization, "remove", name, _request_id(idempotency_key))).to_dict()
