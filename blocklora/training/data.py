"""A concept's training images: a folder of pictures, optional same-name .txt captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def to_tensor(img: Image.Image | np.ndarray, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, center-crop, scale to [-1, 1]; (3, res, res)."""
    img = Image.fromarray(np.asarray(img)) if not isinstance(img, Image.Image) else img
    img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1).contiguous()


def load_concept_images(folder: str | Path, resolution: int) -> tuple[torch.Tensor, list[str | None]]:
    """(N, 3, res, res) images and their captions (None where there is no .txt beside the image)."""
    files = image_files(folder)
    images = torch.stack([to_tensor(Image.open(p), resolution) for p in files])
    captions = [p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else None for p in files]
    return images, captions
