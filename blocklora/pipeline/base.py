"""Base models: the embedded tiny default, a local diffusers folder, or a hub id.

Every base carries a fingerprint of its weights so that a concept trained on one base is refused
by a federation or a pipeline built on another.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from blocklora.config import TEXT_ENCODERS, TINY, TINY_SD2, TINY_SDXL  # the embedded tiny bases' names
from blocklora.pipeline.tokenizer import VOCAB_SIZE, clip_tokenizer

TINY_SEED = 1234


@dataclass
class Base:
    """A loaded pipeline plus what identifies it; concepts and merges are applied to `pipe`."""

    pipe: DiffusionPipeline
    fingerprint: str  # sha256 of the UNet and text encoder weights as loaded, before any concept
    spec: str  # what was asked for: a name in TINY_BUILDERS, a folder, or a hub id

    @property
    def resolution(self) -> int:
        """Native image size in pixels (latent sample size x VAE downscale)."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """Component name -> text encoder, in conditioning order (SDXL has two)."""
        return text_encoders(self.pipe)

    @property
    def tokenizers(self) -> dict[str, PreTrainedTokenizerBase]:
        """Text-encoder component name -> the tokenizer that feeds it."""
        return {comp: getattr(self.pipe, TEXT_ENCODERS[comp]) for comp in self.text_encoders}


def text_encoders(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name; a pipeline may lack the second one."""
    return {comp: te for comp in TEXT_ENCODERS if (te := getattr(pipe, comp, None)) is not None}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """SD1.x-shaped UNet small enough for a CPU test: 16x16 latents, 2 resolutions, cross-attn."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
    )


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL-shaped UNet (text_time added conditioning, linear projections, 2-layer transformers)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def tiny_clip(projection: bool = False, hidden_act: str = "quick_gelu") -> CLIPTextModel:
    """A 2-layer, 32-wide CLIP text encoder; `projection`: SDXL's second one (pooled, projected)."""
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=32, hidden_act=hidden_act,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_pipeline() -> StableDiffusionPipeline:
    """The embedded default (SD 1.x): every weight drawn from `TINY_SEED`, so every machine builds the same."""
    torch.manual_seed(TINY_SEED)
    return StableDiffusionPipeline(
        unet=tiny_unet(), vae=tiny_vae(), text_encoder=tiny_clip(), tokenizer=clip_tokenizer(),
        scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sd2_pipeline() -> StableDiffusionPipeline:
    """SD 2.x in miniature: v-prediction, linear attention projections, per-block head dims and a
    GELU text encoder (OpenCLIP's activation); one text encoder, so the SD 1.x pipeline class."""
    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=True, cross_attention_dim=32,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=tiny_clip(hidden_act="gelu"), tokenizer=clip_tokenizer(),
        scheduler=tiny_scheduler("v_prediction"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """SDXL in miniature: two text encoders (hidden states side by side: 32 + 32 = the UNet's 64),
    the second's pooled projection (32) plus 6 time ids x 8 as the added embedding (80)."""
    torch.manual_seed(TINY_SEED)
    return StableDiffusionXLPipeline(
        unet=tiny_sdxl_unet(), vae=tiny_vae(), text_encoder=tiny_clip(), text_encoder_2=tiny_clip(projection=True),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), scheduler=tiny_scheduler(),
    )


# Named specs that build a random tiny pipeline from code instead of reading a folder.
TINY_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    TINY: tiny_pipeline, TINY_SD2: tiny_sd2_pipeline, TINY_SDXL: tiny_sdxl_pipeline}
# The builders draw every weight from torch's one global generator: two threads building at once
# (e.g. three coordinators started side by side) would interleave their draws and get other weights.
_TINY_BUILD = threading.Lock()


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 over names, shapes, dtypes and bytes of the modules' weights, in name order."""
    h = hashlib.sha256()
    for i, mod in enumerate(modules):
        for name, t in sorted(mod.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{i}:{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_base(spec: str = TINY, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> Base:
    """Load a base by spec, in `dtype`. The fingerprint is taken before anything touches the weights,
    on them as float32 (a folder is read in float32, then cast): a half-precision replica or client
    and a float32 one of the same files agree on it."""
    if spec in TINY_BUILDERS:
        with _TINY_BUILD:
            pipe = TINY_BUILDERS[spec]()
    else:
        pipe = _from_pretrained(spec, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    encoders = list(text_encoders(pipe).values())
    for module in (pipe.unet, pipe.vae, *encoders):
        module.requires_grad_(False)
        module.eval()
    fp = weights_fingerprint(pipe.unet, *encoders)
    pipe.to(device or default_device())
    if pipe.unet.dtype != dtype:  # torch's Module.to: diffusers' warns on every cast (0.42, an empty fp32 list)
        for module in (pipe.unet, pipe.vae, *encoders):
            torch.nn.Module.to(module, dtype=dtype)
    return Base(pipe=pipe, fingerprint=fp, spec=spec)


def _from_pretrained(spec: str, dtype: torch.dtype) -> DiffusionPipeline:
    """A local diffusers folder, or a hub id when online; a clear message instead of a trace."""
    path = Path(spec).expanduser()
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_local and not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"base model {spec!r} is not a diffusers pipeline folder (no model_index.json there); "
            f"pass one of {sorted(TINY_BUILDERS)}, a folder saved with pipe.save_pretrained(), or a hub id such as "
            f"'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else spec, dtype=dtype,
                                                 safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise RuntimeError(
            f"could not load base model {spec!r}" + (" (HF_HUB_OFFLINE=1: the hub is not consulted, so "
            "a hub id works only if it is already in the local cache)" if offline else "")
            + f"; download it on a connected machine and pass the folder instead. Cause: {err}"
        ) from None
    if not hasattr(pipe, "unet"):
        raise ValueError(f"{spec!r} is a {type(pipe).__name__}; blocklora needs a UNet-based Stable Diffusion pipeline")
    return pipe
