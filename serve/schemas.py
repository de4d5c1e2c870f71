"""The HTTP API's request and response bodies, with every bound a client can hit spelled out.

Bounds live on the fields so that FastAPI's 422 names the bound that was broken ("Input should be
less than or equal to 50") and the OpenAPI docs show it before anyone sends a request. Request bodies
are read strictly: an integer field takes only a JSON integer (`"seed": true` and `"steps": 7.0`
are refused, as the artifact metadata's schema refuses them), a number field any JSON number but a
boolean.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from blocklora.config import GenerateConfig
from blocklora.pipeline.prompts import concept_refs

MAX_PROMPT_CHARS = 1000  # CLIP reads 77 tokens; longer text only costs tokenizer time
MAX_STEPS = 100
MAX_SIDE = 1024  # pixels; a multiple of 8 so the VAE's latent grid is whole
MIN_SIDE = 16
MAX_IMAGES = 4  # per request; each image is a sample of the batched denoising loop
MAX_BODY_BYTES = 64 * 1024  # JSON bodies: a request at every bound below, all \u-escaped, is ~40 kB
MAX_CONCEPT_WEIGHT = 4.0  # |α|; merged concepts past a few units only produce noise
# What one request may cost, in `GenerateRequest.cost` units (pixel-steps, weighted above the base's
# native size). Each bound above alone is harmless, together they are not. 2^21 lets the tiny base
# (native 32²) draw at its size at every other bound (0.4 M), or 128² for 8 image-steps; SD1.5 (native
# 512²) 8 image-steps; a GPU deployment raises it (jobs/serve_up.py --max-pixel-steps).
MAX_PIXEL_STEPS = 2**21
_DEFAULTS = GenerateConfig()
ConceptName = Annotated[str, Field(min_length=1, max_length=64)]  # as blocklora.method.artifact.NAME_RE allows


class ConceptWeight(BaseModel):
    """A live concept and its weight α in W0 + Σ α_i dW_i."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: ConceptName
    weight: float = Field(1.0, ge=-MAX_CONCEPT_WEIGHT, le=MAX_CONCEPT_WEIGHT)


class GenerateRequest(BaseModel):
    """One prompt, any subset of the live concepts; `{name}` in the prompt also adds `name`."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"prompt": "a photo of {my-dog} on a beach", "concepts": [{"name": "my-dog", "weight": 1.0}],
         "steps": 20, "seed": 7}]})
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    concepts: list[ConceptName | ConceptWeight] = Field(default_factory=list, max_length=64)
    negative_prompt: str = Field(_DEFAULTS.negative_prompt, max_length=MAX_PROMPT_CHARS)
    steps: int = Field(_DEFAULTS.steps, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(_DEFAULTS.guidance_scale, ge=0.0, le=30.0)
    seed: int = Field(_DEFAULTS.seed, ge=0, le=2**63 - 1, description="image j uses seed + j")
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8,
                              description="pixels; default: the base's native resolution")
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8,
                               description="pixels; default: the base's native resolution")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    collection: ConceptName | None = Field(None, description="a collection whose members the request merges too "
                                                             "(weight 1 unless listed with another)")

    @model_validator(mode="after")
    def _no_duplicate_concepts(self) -> "GenerateRequest":
        names = [c if isinstance(c, str) else c.name for c in self.concepts]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"concept(s) {twice} listed more than once; list each concept once with its weight")
        if self.seed + self.num_images - 1 > 2**63 - 1:
            raise ValueError(f"seed + num_images - 1 must be <= {2**63 - 1}")
        return self

    def cost(self, native: int) -> int:
        """What the request costs, in pixel-steps weighted for attention, on a base of native side
        `native`: width x height x steps x num_images, each image-step multiplied by how many native
        images its pixels hold when that is more than one. A UNet's convolutions cost in proportion to
        the pixels P, its self-attention to P²; at the native P0 the two together cost c per pixel, so a
        step costs at most c·P·(1 + P/P0) ≤ 2c·P·max(1, P/P0): the weighted count bounds real cost within
        a factor of 2, where plain pixel-steps let 1024² x 2 (minutes a step) pass as cheap."""
        pixels, native_pixels = (self.width or native) * (self.height or native), native * native
        return pixels * max(pixels, native_pixels) // native_pixels * self.steps * self.num_images

    def subset(self) -> dict[str, float]:
        """name -> α of every concept the request uses: those listed (a bare name weighs 1.0) and
        those named as {name} in the prompt (1.0 unless listed with another weight)."""
        listed = {c if isinstance(c, str) else c.name: 1.0 if isinstance(c, str) else c.weight for c in self.concepts}
        return dict.fromkeys(concept_refs(self.prompt), 1.0) | listed


class Images(BaseModel):
    """Several images of one request, and the federation version whose concepts drew them."""

    version: int
    seeds: list[int]
    images: list[str] = Field(description="base64-encoded PNGs, in seed order")


class Concept(BaseModel):
    name: str
    slot: int
    triggers: list[str]
    class_word: str
    owner: str
    status: str = Field(description="live, or reserved (still being trained)")
    version: int | None = Field(None, description="the federation version it went live at")
    expires_at: float | None = Field(None, description="a reservation's end, wall-clock seconds")


class Concepts(BaseModel):
    """One page of the library, in name order."""

    version: int
    total: int = Field(description="entries matching the filters, over every page")
    concepts: list[Concept]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last one")


class CollectionBody(BaseModel):
    """The members a collection is set to: live concepts in pairwise different slots."""

    model_config = ConfigDict(extra="forbid")
    members: list[ConceptName] = Field(max_length=64)


class InvitationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, description="the person's name, shown as owner")
    quota: int | None = Field(None, ge=1, le=100_000, description="live concepts + reservations they may hold")
    uses: int = Field(1, ge=1, le=100, description="clients that may register with the code")
