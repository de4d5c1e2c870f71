"""Every knob of blocklora in one typed place.

Frozen dataclasses so a config can be hashed, compared and written into an artifact's metadata
as JSON; only `jobs/` and the CLI turn argv into these objects, through `add_flags` / `from_args`,
which derive each flag's name, type, default and help from the field, so no script re-types them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

# Attention projections of diffusers' self- (attn1) and cross-attention (attn2) blocks.
UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# The feed-forward of each transformer block (GEGLU in: 8x the channels out; and out): more rows per slot.
FEED_FORWARD_TARGETS: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2")
# Attention projections of transformers' CLIPTextModel.
TEXT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
ROW_LAYOUTS: tuple[str, ...] = ("block", "strided")  # how a slot's rows lie in a weight (blocklora.method.partition)
# The pipeline components that encode prompts, in conditioning order, and the tokenizer feeding each.
# Everything per text encoder (token ids, trigger vectors, widths) is keyed by these names.
TEXT_ENCODERS: dict[str, str] = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def cache_root() -> Path:
    """This node's blocklora cache (tokenizer files, the base's class pictures): `$BLOCKLORA_CACHE`,
    else `~/.cache/blocklora`. Read at each use, so a process can point it elsewhere (the tests do)."""
    return Path(os.environ.get("BLOCKLORA_CACHE") or Path.home() / ".cache" / "blocklora")


def cache_max_bytes() -> int:
    """How much the base's class pictures may fill of this node's cache before the least recently used
    sets are removed: `$BLOCKLORA_CACHE_MAX_MB` megabytes, default 2048 (a set of 8 pictures is 0.4 MB
    on the toy base, ~25 MB at SD1.5's 512 px; a retention run at SD1.5 size would write ~2.4 GB)."""
    raw = os.environ.get("BLOCKLORA_CACHE_MAX_MB", "2048")
    try:
        megabytes = float(raw)
    except ValueError:
        megabytes = float("nan")
    if not (math.isfinite(megabytes) and megabytes > 0):
        raise ValueError(f"BLOCKLORA_CACHE_MAX_MB must be a positive number of megabytes, got {raw!r}")
    return int(megabytes * 2**20)


TINY = "tiny"  # the random tiny SD-architecture pipeline, built from config with a fixed seed
TINY_SD2, TINY_SDXL = "tiny-sd2", "tiny-sdxl"  # the same for the SD 2.x (v-prediction) and SDXL families
# Precision names (blocklora/pipeline/precision.py maps them to torch dtypes): accelerate's for training,
# torch's for the dtype a base is loaded in to generate and serve.
MIXED_PRECISION: tuple[str, ...] = ("no", "fp16", "bf16")
DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")


def knob(default: Any, help: str, flag: str | None = None) -> Any:
    """A config field that carries its help text, so every CLI that exposes it shows the same words.

    `flag` names the command-line flag where it is not the field's name in --kebab-case (kept for
    flags older than `add_flags`, e.g. --slots for num_slots)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of every concept's adapter in one federation; all concepts must agree on it."""

    rank: int = knob(4, "r: LoRA rank, rows of A and columns of B")
    num_slots: int = knob(16, "K: how many concepts can live side by side (row blocks per layer)", flag="--slots")
    erasure: float = knob(0.1, "λ: rate of randomized output erasure during training (0 disables); "
                               "higher keeps merged concepts apart (docs/results)")
    unet_targets: tuple[str, ...] = knob(UNET_TARGETS, "module-name suffixes wrapped in the UNet", flag="--targets")
    text_targets: tuple[str, ...] = knob((), "suffixes wrapped in the text encoder, e.g. q_proj (none: UNet only)")
    tokens_per_concept: int = knob(1, "new trigger tokens each concept learns")
    blockwise: bool = knob(True, "off: B owns every row (plain LoRA; the Table 3 ablation)")
    row_layout: str = knob("block", "which rows a slot owns: 'block' (one contiguous run) or 'strided' "
                                    "(every K-th row: spread over the attention heads)")
    freeze_a: str = knob("none", "'none' or 'orthogonal': Orthogonal Adaptation's frozen, orthogonal A")

    def __post_init__(self) -> None:
        # upper bounds too: an artifact's metadata carries this config, and the loader builds lists
        # (trigger names, row blocks) from it before comparing it with the federation's
        for name, top in (("rank", 1024), ("num_slots", 1024), ("tokens_per_concept", 64)):
            if not 1 <= getattr(self, name) <= top:
                raise ValueError(f"{name} must be in 1..{top}, got {getattr(self, name)}")
        if not 0.0 <= self.erasure < 1.0:
            raise ValueError(f"erasure rate λ must be in [0, 1), got {self.erasure}")
        if self.row_layout not in ROW_LAYOUTS:
            raise ValueError(f"row_layout must be one of {', '.join(ROW_LAYOUTS)}, got {self.row_layout!r}")
        if self.freeze_a not in ("none", "orthogonal"):
            raise ValueError(f"freeze_a must be 'none' or 'orthogonal', got {self.freeze_a!r}")
        object.__setattr__(self, "unet_targets", tuple(self.unet_targets))
        object.__setattr__(self, "text_targets", tuple(self.text_targets))


@dataclass(frozen=True)
class TrainConfig:
    """One concept's training run (DreamBooth loss + new token embedding, jointly)."""

    steps: int = knob(200, "optimizer steps")
    batch_size: int = knob(2, "instance images per step (prior images add as many again)")
    lr: float = knob(1e-3, "learning rate of A and the owned rows of B")
    token_lr: float = knob(5e-3, "learning rate of the concept's trigger embedding(s) (0: never trained)")
    token_init: str = knob("class_word", "where the trigger starts: 'class_word' (ED-LoRA, ours) or 'rare', "
                                         "a fixed rare vocabulary token per slot (DreamBooth's 'sks'; DB-LoRA)")
    resolution: int = knob(64, "training images are resized and center-cropped to this")
    seed: int = knob(0, "everything random in training derives from it")
    prior_preservation: bool = knob(False, "add a class-prompt loss on images of the base model", flag="--prior")
    prior_weight: float = knob(1.0, "weight of the prior-preservation loss")
    quiet_weight: float = knob(0.0, "weight of a penalty on the concept's own residual over the base's class-prompt "
                                    "pictures (0: off): rows that stay quiet on pictures without the concept, "
                                    "which is what the other concepts' prompts are once merged")
    quiet_classes: tuple[str, ...] = knob((), "other class words whose base pictures the quiet penalty also keeps "
                                              "the rows quiet on: the classes a merge is expected to hold beside "
                                              "this one (none: the concept's own class only; unused while "
                                              "quiet_weight is 0)")
    merge_scale_share: float = knob(0.0, "share of steps that train the concept at the strength an Eq. 5 merge "
                                          "of n concepts gives it: its residual scaled by 1/n, n drawn from 2..K "
                                          "(0: every step at full strength)")
    num_class_images: int = knob(8, "base pictures of the class prompt, made when prior preservation or the "
                                    "quiet penalty is on")
    checkpoint_every: int = knob(50, "steps between resumable checkpoints (0: never)")
    report_every: int = knob(25, "steps between metric reports of a Ray Train worker (each report is a "
                                 "round trip through the Train controller)")
    flip: bool = knob(True, "random horizontal flips as augmentation")
    prompt_template: str = knob("a photo of {trigger} {class_word}", "instance prompt when an image has no caption")
    mixed_precision: str = knob("no", "'no' (float32), 'bf16' or 'fp16' (CUDA only): the frozen base in that "
                                      "half dtype, adapters, trigger embeddings and optimizer state float32, "
                                      "forward under autocast; the artifact is float32 either way")

    @property
    def uses_class_images(self) -> bool:
        """Whether training needs the base's pictures of the class prompt (prior or quiet penalty)."""
        return self.prior_preservation or self.quiet_weight > 0

    def quiet_others(self, class_word: str) -> list[str]:
        """The classes besides the concept's own whose base pictures the quiet penalty also keeps."""
        return [word for word in self.quiet_classes if word != class_word] if self.quiet_weight > 0 else []

    def __post_init__(self) -> None:
        object.__setattr__(self, "quiet_classes", tuple(self.quiet_classes))  # a list from JSON compares equal
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "resolution", "report_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.quiet_weight < 0:
            raise ValueError(f"quiet_weight must be >= 0, got {self.quiet_weight}")
        if not 0.0 <= self.merge_scale_share <= 1.0:
            raise ValueError(f"merge_scale_share must be in [0, 1], got {self.merge_scale_share}")
        if not all(isinstance(w, str) and w.strip() for w in self.quiet_classes):
            raise ValueError(f"quiet_classes must be non-empty words, got {list(self.quiet_classes)}")
        if self.lr <= 0 or self.token_lr < 0:
            raise ValueError("learning rates must be positive")
        if self.token_init not in ("class_word", "rare"):
            raise ValueError(f"token_init must be 'class_word' or 'rare', got {self.token_init!r}")


def to_json(cfg: Any) -> str:
    """Canonical JSON of the fields that differ from their defaults (sorted keys): equal configs give
    equal strings, and a field added later at its default leaves every string, and every cache keyed
    by one (benchmarks/retention/study.py), as it was."""
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.default is dataclasses.MISSING or getattr(cfg, f.name) != f.default}
    return json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in changed.items()},
                      sort_keys=True)


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

    steps: int = knob(20, "denoising steps per image")
    guidance_scale: float = knob(5.0, "classifier-free guidance scale", flag="--guidance")
    seed: int = knob(0, "image j of a request starts from the noise of seed + j")
    width: int = knob(64, "image width in pixels")
    height: int = knob(64, "image height in pixels")
    negative_prompt: str = knob("", "what the images should not show")


@dataclass(frozen=True)
class PrecisionConfig:
    """The dtype of a frozen base that generates: the CLI, the coordinator and the serve replicas."""

    dtype: str = knob("float32", "dtype the base is loaded in to generate and serve: float32, float16 or "
                                 "bfloat16 (concepts are applied in it; artifacts stay float32)")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class FederationConfig:
    """Knobs of one federation's coordinator (the adapter shape is its AdapterConfig)."""

    base: str = knob("tiny", "'tiny' (or 'tiny-sd2', 'tiny-sdxl'), a diffusers folder or a hub id",
                     flag="--base-model")
    reservation_ttl_s: float = knob(3600.0, "seconds before a reserved slot with no submitted concept returns",
                                    flag="--reservation-ttl")
    max_artifact_bytes: int = knob(64 * 1024 * 1024, "submissions above this many bytes are refused before parsing")
    max_concepts_per_person: int = knob(4, "live concepts + reservations one invited person may hold over all "
                                           "their clients, unless the invitation says otherwise (the admin: no limit)")
    max_collections_per_person: int = knob(4, "collections one person may own (each is kept merged in the "
                                              "coordinator's memory; the admin: no limit)")
    invitation_ttl_s: float = knob(7 * 86400.0, "seconds an invitation can be redeemed, unless it says otherwise",
                                   flag="--invitation-ttl")

    def __post_init__(self) -> None:
        for name in ("reservation_ttl_s", "invitation_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_artifact_bytes", "max_concepts_per_person", "max_collections_per_person"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class PretrainConfig:
    """The toy base's pretraining run (blocklora/toy/pretrain.py): VAE, then UNet + text encoder."""

    steps: int = knob(9000, "UNet + text encoder optimizer steps")
    batch: int = knob(16, "denoiser batch size")
    lr: float = knob(1e-3, "denoiser peak learning rate")
    snr_gamma: float = knob(5.0, "min-SNR loss weighting cap (0: plain MSE)")
    unet_width: int = knob(32, "UNet channels at its first level, doubling per level (32: the committed base; "
                               "wider gives each concept's slot more rows, at a cost a GPU can pay)")
    teacher: str = knob("", "an exported toy base whose denoiser the new one also learns to predict like "
                            "(distillation: a wider base learns to draw in fewer steps); none: data only")
    teacher_weight: float = knob(1.0, "weight of the MSE to the teacher's prediction beside the data term")
    vae_steps: int = knob(1500, "VAE optimizer steps (stage 1)")
    vae_batch: int = knob(32, "VAE batch size")
    seed: int = knob(0, "weights, data stream and noise all derive from it")
    threads: int = knob(1, "torch CPU threads (the machine is shared)")
    device: str = knob("cpu", "torch device to train on, e.g. cuda on a GPU machine (data and noise stay CPU-drawn)")
    data_workers: int = knob(0, "processes drawing training batches (0: the training process draws them)")
    checkpoint_every: int = knob(100, "steps between checkpoints")
    sample_every: int = knob(1000, "denoiser steps between sample grids")
    eval_seeds: int = knob(8, "judge pictures per (shape, colour) pair in the card")
    sample_steps: int = knob(20, "DDIM steps of the card's and the progress grids' pictures and the judge's")
    note: str = knob("", "text for the model card, e.g. what changed when a run was resumed")

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "vae_steps", "vae_batch", "threads", "checkpoint_every", "sample_every",
                     "eval_seeds", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be >= 0, got {self.data_workers}")
        if self.unet_width < 16 or self.unet_width % 8:
            raise ValueError("unet_width must be a multiple of 8 (norm groups, attention heads) >= 16, "
                             f"got {self.unet_width}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: its `knob(flag=...)` or its name in --kebab-case."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class _Words(argparse.Action):
    """A tuple-of-names flag: `--targets to_q to_k` and `--targets to_q,to_k` both give ('to_q', 'to_k')."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, tuple(w for v in values for w in v.split(",") if w))


def _selected(cls: type, only: Iterable[str] | None, skip: Iterable[str]) -> list[dataclasses.Field]:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((set(only or ()) | set(skip)) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {names}")
    return [f for f in dataclasses.fields(cls) if (only is None or f.name in only) and f.name not in skip]


def _dest(cls: type, name: str) -> str:
    return f"{cls.__name__}.{name}"


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults: Any = None,
              only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> None:
    """Add one flag per field of config class `cls` to `parser`, in a group named after the class.

    Name, type and help come from the field (bools get --x / --no-x, tuples take names separated by
    spaces or commas); defaults come from `defaults`, an instance such as a preset (else `cls()`).
    Each flag stores under "<class>.<field>", so `from_args` reads back exactly these flags even
    when another config on the same parser has a field of the same name (e.g. steps)."""
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in _selected(cls, only, skip):
        kind, default = hints[f.name], getattr(defaults, f.name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_ = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        kw: dict[str, Any] = {"dest": _dest(cls, f.name), "default": default, "help": help_}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw |= {"nargs": "*", "action": _Words, "metavar": "NAME"}
        else:
            kw |= {"type": kind, "metavar": flag_name(f)[2:].upper().replace("-", "_")}
        group.add_argument(flag_name(f), **kw)


def from_args(cls: type, args: argparse.Namespace, parser: argparse.ArgumentParser | None = None,
              **overrides: Any) -> Any:
    """The frozen config from parsed flags (fields without a flag keep their defaults), plus overrides.

    A value the config refuses (e.g. --steps 0) ends as `parser.error`, i.e. usage and the reason,
    exit status 2, like a wrong type does; without a parser the ValueError propagates."""
    values = {f.name: getattr(args, _dest(cls, f.name)) for f in dataclasses.fields(cls)
              if hasattr(args, _dest(cls, f.name))}
    try:
        return cls(**values | overrides)
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))


def to_argv(cfg: Any, skip: Iterable[str] = ()) -> list[str]:
    """The flags that `add_flags` + `from_args` turn back into `cfg`: forwards a config to a sub-job."""
    argv: list[str] = []
    for f in _selected(type(cfg), None, skip):
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            argv.append(flag_name(f) if value else "--no-" + flag_name(f)[2:])
        elif isinstance(value, tuple):
            argv += [flag_name(f), *value]
        elif isinstance(value, str):
            argv.append(f"{flag_name(f)}={value}")  # one token: a text that starts with '-' stays a value
        else:
            argv += [flag_name(f), str(value)]
    return argv
