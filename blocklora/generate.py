"""Sampling from a (merged) base, and contact sheets a person can look at."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from blocklora.base import Base
from blocklora.config import GenerateConfig


@torch.no_grad()
def generate(base: Base, prompt: str, cfg: GenerateConfig = GenerateConfig(), num_images: int = 1) -> list[Image.Image]:
    """Images for one prompt; image j uses seed cfg.seed + j, so any single image is reproducible."""
    gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + j) for j in range(num_images)]
    out = base.pipe([prompt] * num_images, negative_prompt=[cfg.negative_prompt] * num_images,
                    num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                    width=cfg.width, height=cfg.height, generator=gens)
    return out.images


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], cell: int = 128) -> Image.Image:
    """One labelled row per entry; images upscaled (nearest) to `cell` pixels so tiny ones are visible."""
    cols = max(len(imgs) for _, imgs in rows)
    label_w = 260
    sheet = Image.new("RGB", (label_w + cols * (cell + 4), len(rows) * (cell + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, imgs) in enumerate(rows):
        y = 4 + i * (cell + 4)
        draw.multiline_text((6, y + 4), _wrap(label, 36), fill="black")
        for j, img in enumerate(imgs):
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (label_w + j * (cell + 4), y))
    return sheet


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
