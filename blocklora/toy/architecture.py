"""The toy base's architecture: a Stable-Diffusion-shaped pipeline small enough to pretrain on a CPU.

AutoencoderKL (64 px -> 16x16x4 latents), a UNet2DConditionModel with cross-attention at every level,
and a CLIPTextModel with the real CLIP tokenizer's 49,408 tokens, so concepts' new tokens fit.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from blocklora.pipeline.tokenizer import VOCAB_SIZE, clip_tokenizer
from blocklora.toy.draw import SIZE

# Stable Diffusion's noise schedule, shared by pretraining (DDPM) and the exported sampler (DDIM).
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def build_vae() -> AutoencoderKL:
    """4x downscale (64 px -> 16x16x4 latents): flat-coloured shapes need little detail.

    One norm group: with one channel per group, GroupNorm is instance norm, which erases a flat
    picture's colour; the VAE then paints blob artifacts to smuggle it past the norm.
    """
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=1, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def build_unet(width: int = 32) -> UNet2DConditionModel:
    """Cross-attention at every level, `width` channels at the first and doubling per level.

    A slot owns width / K rows of the narrowest projection: at the committed width 32 and K = 16
    slots that is 2 rows (SD1.5's 320 gives 20), which caps what a concept's weights can learn
    (docs/results, concept capacity); a GPU run can afford a wider base."""
    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width, 4 * width), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
    )


def build_text_encoder() -> CLIPTextModel:
    """Full 49,408-row embedding so the real CLIP tokenizer (and concepts' new tokens) fit."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=64,
    ))


def build_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel,
                   text_encoder: CLIPTextModel) -> StableDiffusionPipeline:
    """The three modules behind DDIM and the CLIP tokenizer, as `save_pretrained` will export them."""
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
