"""CLIP alignment scores for customized generations, following the DreamBooth / Custom Diffusion
protocol, with any open_clip model.

- image alignment: mean cosine similarity over every (generated, reference) pair of CLIP image
  embeddings — does the generation show *this* concept?
- text alignment: mean cosine similarity between each generated image and the prompt with the
  concept's trigger tokens replaced by its class word ("a photo of <blk3> dog" -> "a photo of
  dog") — does the generation still follow the prompt? The trigger has no meaning to CLIP.

Weights are never downloaded here: pass `pretrained` as a local checkpoint path (or a tag that is
already in open_clip's cache); `pretrained=None` gives a randomly initialised model, which is only
good for testing the plumbing.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

ImageLike = Image.Image | np.ndarray | torch.Tensor


def class_prompt(prompt: str, triggers: Sequence[str], class_word: str) -> str:
    """Replace the trigger tokens (and a class word right after them) by the class word alone."""
    if not triggers:
        return prompt
    run = r"\s*".join(re.escape(t) for t in triggers)
    out = re.sub(rf"{run}(\s+{re.escape(class_word)}\b)?", class_word, prompt)
    return re.sub(r"\s+", " ", out).strip()


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL image from PIL, an HxWx3 uint8/float array, or a 3xHxW tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


class ClipScorer:
    """One open_clip model and its preprocessing; embeddings are L2-normalised."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.model.eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self.name, self.pretrained = model_name, pretrained

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(to_pil(im)) for im in images]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(batch).float(), dim=-1)  # (B, D)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)  # (T, D)

    def image_alignment(self, generated: Sequence[ImageLike], references: Sequence[ImageLike]) -> float:
        """Mean cosine over every generated x every reference image."""
        return float((self.embed_images(generated) @ self.embed_images(references).T).mean())

    def text_alignment(self, generated: Sequence[ImageLike], prompt: str) -> float:
        """Mean cosine between each generated image and `prompt` (already trigger-free)."""
        return float((self.embed_images(generated) @ self.embed_texts([prompt]).T).mean())

    def score(self, generated: Sequence[ImageLike], references: Sequence[ImageLike], prompt: str,
              triggers: Sequence[str], class_word: str) -> dict[str, float]:
        """Both alignments of one concept's generations for the prompt they were made from."""
        return {"image_alignment": self.image_alignment(generated, references),
                "text_alignment": self.text_alignment(generated, class_prompt(prompt, triggers, class_word))}
