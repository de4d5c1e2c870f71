"""A concept's training images: a folder of pictures, optional same-name .txt captions.

The pictures come from a client's folder, possibly from anywhere: each one's size is read from its
header and checked before a pixel is decoded. PIL's own guard counts pixels only: a PNG of a kilobyte
and 400,000 x 1 pixels passed it, then grew to gigabytes in the resize to the training resolution,
which scales the short side up to `resolution` (docs/security.md, issue #40.11).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 64_000_000  # width x height of one picture: a 64 MP photo decodes to 192 MB of RGB
MAX_ASPECT = 8  # long side / short side: training keeps the centre square, and the resize scales the
# short side to the resolution, so the long side becomes at most MAX_ASPECT x the resolution


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


def open_image(path: Path, resolution: int) -> Image.Image:
    """The picture at `path` as RGB, decoded only after its declared size passed the bounds (JPEGs at
    the smallest scale whose short side still holds `resolution`); ValueError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * min(w, h):
                raise ValueError(f"{path} is {w:,} x {h:,} pixels; a training picture may have at most "
                                 f"{MAX_PIXELS:,} pixels and a long side at most {MAX_ASPECT}x its short side: "
                                 "crop or resize it")
            img.draft("RGB", (resolution, resolution))
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:  # not an image, truncated, or PIL's own guard
        raise ValueError(f"{path} could not be read as a picture: {err}") from None


def load_concept_images(folder: str | Path, resolution: int) -> tuple[torch.Tensor, list[str | None]]:
    """(N, 3, res, res) images and their captions (None where there is no .txt beside the image)."""
    files = image_files(folder)
    images = torch.stack([to_tensor(open_image(p, resolution), resolution) for p in files])
    captions = [p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else None for p in files]
    return images, captions
