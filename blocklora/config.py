"""Every knob of blocklora in one typed place.

Frozen dataclasses so a config can be hashed, compared and written into an artifact's metadata
as JSON; only `jobs/` and the CLI turn argv into these objects.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# Attention projections of diffusers' self- (attn1) and cross-attention (attn2) blocks.
UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# Attention projections of transformers' CLIPTextModel.
TEXT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of every concept's adapter in one federation; all concepts must agree on it."""

    rank: int = 4  # r: rows of A, columns of B
    num_slots: int = 16  # K: how many concepts can live side by side (row blocks per layer)
    erasure: float = 0.1  # λ: rate of randomized output erasure during training (0 disables)
    unet_targets: tuple[str, ...] = UNET_TARGETS  # module-name suffixes wrapped in the UNet
    text_targets: tuple[str, ...] = ()  # suffixes wrapped in the text encoder (empty: UNet only)
    tokens_per_concept: int = 1  # new trigger tokens each concept learns
    blockwise: bool = True  # False: B owns every row (plain LoRA; the Table 3 ablation)
    freeze_a: str = "none"  # "none" | "orthogonal": Orthogonal Adaptation's frozen, orthogonal A

    def __post_init__(self) -> None:
        # upper bounds too: an artifact's metadata carries this config, and the loader builds lists
        # (trigger names, row blocks) from it before comparing it with the federation's
        for name, top in (("rank", 1024), ("num_slots", 1024), ("tokens_per_concept", 64)):
            if not 1 <= getattr(self, name) <= top:
                raise ValueError(f"{name} must be in 1..{top}, got {getattr(self, name)}")
        if not 0.0 <= self.erasure < 1.0:
            raise ValueError(f"erasure rate λ must be in [0, 1), got {self.erasure}")
        if self.freeze_a not in ("none", "orthogonal"):
            raise ValueError(f"freeze_a must be 'none' or 'orthogonal', got {self.freeze_a!r}")
        object.__setattr__(self, "unet_targets", tuple(self.unet_targets))
        object.__setattr__(self, "text_targets", tuple(self.text_targets))


@dataclass(frozen=True)
class TrainConfig:
    """One concept's training run (DreamBooth loss + new token embedding, jointly)."""

    steps: int = 200  # optimizer steps
    batch_size: int = 2  # instance images per step (prior images add as many again)
    lr: float = 1e-3  # learning rate of A and the owned rows of B
    token_lr: float = 5e-3  # learning rate of the concept's token embedding(s) (0: never trained)
    token_init: str = "class_word"  # "class_word": start at the class word (ED-LoRA, ours); "rare": a
    # fixed rare vocabulary token per slot (DreamBooth's "sks"), for DB-LoRA with token_lr = 0
    resolution: int = 64  # training images are resized and center-cropped to this
    seed: int = 0  # everything random in training derives from it
    prior_preservation: bool = False  # add a class-prompt loss on images of the base model
    prior_weight: float = 1.0  # weight of that loss
    num_class_images: int = 8  # prior images generated from the base when preservation is on
    checkpoint_every: int = 50  # steps between resumable checkpoints (0: never)
    flip: bool = True  # random horizontal flips as augmentation
    prompt_template: str = "a photo of {trigger} {class_word}"  # instance prompt when no caption

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.token_lr < 0:
            raise ValueError("learning rates must be positive")
        if self.token_init not in ("class_word", "rare"):
            raise ValueError(f"token_init must be 'class_word' or 'rare', got {self.token_init!r}")


def to_json(cfg: Any) -> str:
    """Canonical JSON of a config (sorted keys) so equal configs give equal strings."""
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config from a dict, refusing unknown keys by name instead of ignoring them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings shared by the CLI, the main job and the HTTP API's defaults."""

    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    width: int = 64
    height: int = 64
    negative_prompt: str = ""


@dataclass(frozen=True)
class FederationConfig:
    """Knobs of one federation's coordinator (the adapter shape is its AdapterConfig)."""

    base: str = "tiny"  # base spec for blocklora.base.load_base: "tiny", a folder or a hub id
    reservation_ttl_s: float = 3600.0  # a reserved slot with no submitted concept returns after this
    max_artifact_bytes: int = 64 * 1024 * 1024  # submissions above this are refused before parsing
    max_slots_per_client: int = 4  # reservations + live concepts one client may hold (the admin: no limit)

    def __post_init__(self) -> None:
        if self.reservation_ttl_s <= 0:
            raise ValueError(f"reservation_ttl_s must be > 0 seconds, got {self.reservation_ttl_s}")
        for name in ("max_artifact_bytes", "max_slots_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
