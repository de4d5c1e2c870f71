"""What a generator replica returns or raises to the ingress, in a module of its own: the ingress (the
HTTP front) unpickles them, and this way imports neither torch nor diffusers, which only the generator
needs (seconds of a core per ingress replica, at its start or at its first request)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class DrawnImages:
    """One request's images as raw pixels; the ingress encodes them (as PNG in `schemas.Images`)."""

    version: int  # the federation version whose concepts drew them
    seeds: list[int]
    pixels: np.ndarray  # (num_images, H, W, 3) uint8

    def png(self, j: int) -> bytes:
        """Image j as PNG bytes (done by the ingress, so a replica's time goes to denoising)."""
        buf = io.BytesIO()
        Image.fromarray(self.pixels[j]).save(buf, format="PNG")
        return buf.getvalue()


class ConceptUnavailable(KeyError):
    """A request names a concept that is not live at the version the replica generated with."""

    def __init__(self, names: list[str], version: int) -> None:
        super().__init__(names, version)
        self.names, self.version = names, version

    def __str__(self) -> str:
        return f"concept(s) {self.names} are not live (federation version {self.version})"
