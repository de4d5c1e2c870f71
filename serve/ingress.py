"""The HTTP front: validation, the concept check against the coordinator, PNG encoding, admin calls.

Every /v1/generate first reads the coordinator's version (one small actor call); when it moved, the
live concept list is re-read, so a removed concept is refused here at once, before a replica is
even asked. Admin calls go to the coordinator with the caller's bearer token: the coordinator
decides who may submit or remove what, the ingress holds no secret of its own.

(No `from __future__ import annotations` here: Serve's class-based views hand FastAPI the route
signatures, and string annotations would turn the request body into a query parameter.)
"""


import base64
import dataclasses
import email.message
import email.parser
import email.policy
import io
import json
import secrets
from typing import Literal

import ray
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from federation.errors import (ArtifactRejected, FederationError, ReservationError, SlotUnavailable, Unauthorized,
                               UnknownConcept)
from federation.coordinator import START_WAIT_S, get as coordinator_named
from federation.protocol import FederationInfo, LiveConcept
from serve.body_limit import BodyLimit
from serve.replies import ConceptUnavailable
from serve.schemas import MAX_BODY_BYTES, MAX_PIXEL_STEPS, Concept, Concepts, GenerateRequest, Images
from serve.throttle import FailureThrottle

app = FastAPI(title="blocklora", summary="Stable Diffusion with any live subset of a federation's concepts",
              docs_url="/v1/docs", openapi_url="/v1/openapi.json", redoc_url=None)
app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, exempt=(("POST", "/v1/concepts"),))  # uploads cap themselves


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


MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries and part headers around the artifact
MAX_PARTS = 8  # multipart parts of an upload: the artifact and a few form fields at most

# federation errors -> HTTP status; the coordinator's message is passed through as the detail
STATUS = ((Unauthorized, 403), (UnknownConcept, 404), (ArtifactRejected, 422), (ReservationError, 409),
          (SlotUnavailable, 409), (FederationError, 400))


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def _message(err: Exception) -> str:
    """The remote error's own message: str() of Ray's wrapper would add the remote traceback
    (file paths, code lines) to what an HTTP client sees."""
    return str(getattr(err, "cause", None) or err)


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _multipart_file(content_type: str, body: bytes) -> bytes:
    """The file part of a multipart/form-data body. The parts are split on the boundary and only
    their headers parsed (no MIME tree is built): at most MAX_PARTS parts, nested multiparts are
    not opened, so a body of 120,000 tiny parts costs one `split`, not 39 s of parsing."""
    ctype = email.message.Message()
    ctype["content-type"] = content_type
    boundary = ctype.get_param("boundary")
    if not isinstance(boundary, str) or not 0 < len(boundary) <= 70:
        raise HTTPException(400, "multipart/form-data needs a boundary parameter of 1-70 characters")
    pieces = body.split(b"--" + boundary.encode("latin-1", "replace"))
    if len(pieces) - 2 > MAX_PARTS:
        raise HTTPException(400, f"multipart body has {len(pieces) - 2:,} parts; an upload may have at most "
                                 f"{MAX_PARTS} (send the artifact as field 'artifact', or as the raw body)")
    for piece in pieces[1:-1]:
        head, _, payload = piece.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        part = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(head[:MULTIPART_SLACK])
        if part.get_filename() is not None or part.get_param("name", header="content-disposition") == "artifact":
            return payload.removesuffix(b"\r\n")
    raise HTTPException(400, "multipart body has no file part; send the artifact as field 'artifact' "
                             "(curl -F artifact=@concept.safetensors) or as the raw request body")


def _source(request: Request) -> str:
    """The address failed authentications are counted against."""
    return request.client.host if request.client else "unknown"


# many ongoing requests: each costs the ingress only memory, and slow bodies time out (BodyLimit)
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(app)
class Ingress:
    """`api_key` None: /v1/generate and /v1/lora are open; otherwise they need 'Authorization: Bearer <api_key>'.
    `max_pixel_steps`: the most width x height x steps x images one request may ask for."""

    def __init__(self, generator: DeploymentHandle, coordinator: str, namespace: str,
                 api_key: str | None = None, max_pixel_steps: int = MAX_PIXEL_STEPS) -> None:
        self.generator, self.api_key, self.max_pixel_steps = generator, api_key, max_pixel_steps
        self.coordinator = coordinator_named(coordinator, namespace, wait_s=START_WAIT_S)
        info: FederationInfo = ray.get(self.coordinator.info.remote())
        self.max_upload, self.resolution = info.max_artifact_bytes, info.resolution
        self.version, self.live = -1, {}
        self.throttle = FailureThrottle()

    async def _live(self) -> tuple[int, dict[str, LiveConcept]]:
        """(version, name -> live concept), re-read only when the coordinator's version moved."""
        version = await self.coordinator.version.remote()
        if version != self.version:
            rows = await self.coordinator.list_concepts.remote()
            self.version, self.live = version, {r.name: r for r in rows if isinstance(r, LiveConcept)}
        return self.version, self.live

    def _check_api_key(self, request: Request, authorization: str | None) -> None:
        if self.api_key is not None:
            self.throttle.check(_source(request))
            if not secrets.compare_digest(_bearer(authorization), self.api_key):
                self.throttle.failed(_source(request))
                raise HTTPException(403, "API key not accepted")

    async def _call(self, method: str, *args, source: str | None = None):
        """A coordinator call; with `source`, a token-bearing one: refused while the source is
        throttled, and an Unauthorized answer counts against it."""
        if source is not None:
            self.throttle.check(source)
        try:
            return await getattr(self.coordinator, method).remote(*args)
        except FederationError as err:
            if source is not None and isinstance(err, Unauthorized):
                self.throttle.failed(source)
            raise HTTPException(next(s for cls, s in STATUS if isinstance(err, cls)), _message(err)) from None

    @app.post("/v1/generate", response_model=Images,
              responses={200: {"content": {"image/png": {}},
                               "description": "image/png for one image (version in X-BlockLoRA-Version), "
                                              "JSON with base64 PNGs for several"},
                         404: {"description": "a named concept is not live"}})
    async def generate(self, req: GenerateRequest, request: Request,
                       authorization: str | None = Header(None)) -> Response:
        self._check_api_key(request, authorization)
        cost = (req.width or self.resolution) * (req.height or self.resolution) * req.steps * req.num_images
        if cost > self.max_pixel_steps:
            raise HTTPException(422, f"request costs {cost:,} pixel-steps (width x height x steps x num_images); "
                                     f"this server allows at most {self.max_pixel_steps:,} per request "
                                     "(max_pixel_steps): use fewer steps, images or pixels")
        version, live = await self._live()
        missing = [n for n in req.subset() if n not in live]
        if missing:
            raise HTTPException(404, f"concept(s) {missing} are not live (version {version}); "
                                     f"live: {sorted(live)} — see GET /v1/concepts")
        try:
            out = await self.generator.generate.remote(req)  # Serve cancels it if the client goes away
        except ConceptUnavailable as err:  # removed between our check and the replica's sync
            raise HTTPException(404, _message(err)) from None
        if req.num_images == 1:
            return Response(_png(out.pixels[0]), media_type="image/png",
                            headers={"X-BlockLoRA-Version": str(out.version), "X-BlockLoRA-Seed": str(out.seeds[0])})
        return JSONResponse(Images(version=out.version, seeds=out.seeds,
                                   images=[base64.b64encode(_png(p)).decode() for p in out.pixels]).model_dump())

    @app.get("/v1/concepts", response_model=Concepts)
    async def concepts(self) -> Concepts:
        version, live = await self._live()
        return Concepts(version=version, concepts=[Concept.model_validate(r, from_attributes=True)
                                                   for r in sorted(live.values(), key=lambda r: r.slot)])

    @app.get("/v1/lora", responses={200: {"content": {"application/octet-stream": {}},
                                          "description": "pytorch_lora_weights.safetensors of the live set "
                                                         "(version in X-BlockLoRA-Version)"},
                                    404: {"description": "no concept is live"}})
    async def lora(self, request: Request, rule: Literal["sum", "mean"] = "sum",
                   authorization: str | None = Header(None)) -> Response:
        """The live set as ONE standard LoRA file, built from the coordinator's merged factors:
        `pipe.load_lora_weights(folder)` gives W0 + Σ α dW, α = 1 ("sum") or 1/|S| ("mean"). Trigger
        embeddings are not in it (diffusers loads those with `load_textual_inversion`)."""
        self._check_api_key(request, authorization)
        version, data = await self._call("merged_lora", rule)
        return Response(data, media_type="application/octet-stream", headers={
            "X-BlockLoRA-Version": str(version),
            "Content-Disposition": 'attachment; filename="pytorch_lora_weights.safetensors"'})

    @app.get("/v1/healthz")
    async def healthz(self) -> dict:
        """Coordinator reachable and a generator replica synced to it (it loads the base once), and
        the records the coordinator set aside when it loaded its state (federation/manifest.py)."""
        version, live = await self._live()
        replica, info = await self.generator.status.remote(), await self.coordinator.info.remote()
        return {"status": "ok", "version": version, "live": len(live), "replica_version": replica["version"],
                "replica_cancelled_loops": replica["cancelled_loops"],
                "quarantined": [dataclasses.asdict(q) for q in info.quarantined[:20]],
                "quarantined_count": len(info.quarantined)}

    @app.post("/v1/concepts", status_code=201)
    async def upload(self, request: Request, authorization: str | None = Header(None)) -> dict:
        """Submit an artifact (raw body, or multipart field 'artifact') with the token of the client
        that reserved its slot; the coordinator validates it and makes it live."""
        token = _bearer(authorization)
        await self._call("whoami", token, source=_source(request))  # before a byte of the body is read
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else 0
        if size > self.max_upload:
            raise HTTPException(413, f"artifact is {size:,} bytes; this federation accepts at most {self.max_upload:,}")
        body = bytearray()
        async for chunk in request.stream():  # a chunked body declares no length: count while reading
            body += chunk
            if len(body) > self.max_upload + MULTIPART_SLACK:
                raise HTTPException(413, f"upload exceeds {self.max_upload:,} bytes, the most this federation accepts")
        body = bytes(body)
        ctype = request.headers.get("content-type", "")
        data = _multipart_file(ctype, body) if ctype.startswith("multipart/form-data") else body
        if not data:
            raise HTTPException(400, "empty upload: send the artifact's bytes (ConceptArtifact.save file)")
        return (await self._call("submit", token, data, source=_source(request))).to_dict()

    @app.delete("/v1/concepts/{name}")
    async def remove(self, name: str, request: Request, authorization: str | None = Header(None)) -> dict:
        """Take a live concept out (owner or admin token); replicas drop its slot on their next batch."""
        return (await self._call("remove", _bearer(authorization), name, source=_source(request))).to_dict()
