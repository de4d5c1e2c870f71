"""The committed toy base: where it lives and how its model card's pictures are drawn.

`jobs/toy/pretrain_base.py` draws the card's sample grid and the judge draws its test pictures with
these prompts, seeds and sampler settings; a test redraws the grid from a fresh clone and compares
it with the committed one, so the card shows what the committed weights actually do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from blocklora.config import PretrainConfig

TOY_BASE_DIR = Path(__file__).resolve().parents[2] / "models" / "toy-base"
SAMPLES_FILE = "samples.png"
SAMPLE_STEPS = PretrainConfig.sample_steps  # DDIM steps of the card's sampler (the config's default)
GUIDANCE = 5.0  # its classifier-free guidance scale
# One grid row per prompt, one column per seed; the last two pairs are held out of training.
GRID_PROMPTS: tuple[str, ...] = (
    "a large red circle on a white background", "a small blue square on a yellow background",
    "a large green triangle", "a large white star on a dotted black background",
    "a large yellow cross on a purple background", "a large purple heart",
    "a large orange circle", "a large blue square",
)
GRID_SEEDS: tuple[int, ...] = (0, 1, 2, 3)


@torch.no_grad()
def draw(pipe, jobs: list[tuple[str, int]], steps: int = SAMPLE_STEPS, chunk: int = 16) -> list[Image.Image]:
    """One picture per (prompt, seed), each from its own `torch.Generator().manual_seed(seed)`.

    Per-picture generators make a picture independent of its batch-mates and of `chunk`.
    """
    size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    images: list[Image.Image] = []
    for i in range(0, len(jobs), chunk):
        part = jobs[i:i + chunk]
        images += pipe([p for p, _ in part], num_inference_steps=steps, guidance_scale=GUIDANCE,
                       generator=[torch.Generator().manual_seed(s) for _, s in part],
                       height=size, width=size).images
    return images


def sample_grid(pipe, steps: int = SAMPLE_STEPS) -> Image.Image:
    """The model card's grid: a row per prompt in GRID_PROMPTS, a column per seed in GRID_SEEDS."""
    images = draw(pipe, [(p, s) for p in GRID_PROMPTS for s in GRID_SEEDS], steps)
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(GRID_SEEDS), h * len(GRID_PROMPTS)))
    for i, im in enumerate(images):
        grid.paste(im, ((i % len(GRID_SEEDS)) * w, (i // len(GRID_SEEDS)) * h))
    return grid
