"""Sampling from a (merged) base, and contact sheets a person can look at."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from blocklora.config import GenerateConfig
from blocklora.pipeline.base import Base


@torch.no_grad()
def generate(base: Base, prompt: str, cfg: GenerateConfig = GenerateConfig(), num_images: int = 1) -> list[Image.Image]:
    """Images for one prompt; image j uses seed cfg.seed + j, so any single image is reproducible."""
    gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + j) for j in range(num_images)]
    out = base.pipe([prompt] * num_images, negative_prompt=[cfg.negative_prompt] * num_images,
                    num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                    width=cfg.width, height=cfg.height, generator=gens)
    return out.images


@torch.no_grad()
def vae_roundtrip(base: Base, images: list[Image.Image]) -> list[Image.Image]:
    """The pictures encoded and decoded by the base's VAE: what a base that had learned them perfectly
    would still lose in its decoder, so a judge's score of these is a generated picture's practical ceiling."""
    vae = base.pipe.vae
    x = base.pipe.image_processor.preprocess(images).to(vae.device, vae.dtype)  # [-1, 1], as the VAE trained
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return base.pipe.image_processor.postprocess(y, output_type="pil")


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], cell: int = 128,
                  notes: list[list[str]] | None = None, columns: list[str] | None = None) -> Image.Image:
    """One labelled row per entry; images upscaled (nearest) to `cell` pixels so tiny ones are visible.

    `notes[i][j]`, when given, is printed under image j of row i (e.g. its score); `columns` heads
    the columns (e.g. which concept each column shows)."""
    cols = max(len(imgs) for _, imgs in rows)
    label_w, note_h, head_h = 260, 14 if notes else 0, 16 if columns else 0
    row_h = cell + 4 + note_h
    sheet = Image.new("RGB", (label_w + cols * (cell + 4), head_h + len(rows) * row_h + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for j, text in enumerate(columns or []):
        draw.text((label_w + j * (cell + 4) + 4, 2), text, fill="black")
    for i, (label, imgs) in enumerate(rows):
        y = head_h + 4 + i * row_h
        draw.multiline_text((6, y + 4), _wrap(label, 36), fill="black")
        for j, img in enumerate(imgs):
            x = label_w + j * (cell + 4)
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
            if notes and j < len(notes[i]) and notes[i][j]:
                draw.text((x + 4, y + cell + 1), notes[i][j], fill="black")
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
