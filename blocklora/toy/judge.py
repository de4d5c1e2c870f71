"""A small CNN that names the shape and colour of a toy picture's main object.

It turns "does the base draw what it is asked?" into a number: generate from a caption, classify
the picture, compare with the caption's labels. It is trained on blocklora.toy.data pictures from
both splits (it is the examiner, not the examinee) with blur, noise and tint, because generated
pictures are softer and less exact than drawn ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from blocklora.toy.base import SAMPLE_STEPS, draw
from blocklora.toy.data import HELDOUT_PAIRS, TRAIN_PAIRS, make_sample
from blocklora.toy.draw import SIZE, to_tensor
from blocklora.toy.vocabulary import COLOUR_NAMES, SHAPES

JUDGE_DIR = Path(__file__).resolve().parents[2] / "models" / "judge"
JUDGE_FILE = "judge.safetensors"


def _block(a: int, b: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(a, b, 3, stride=stride, padding=1), nn.GroupNorm(8, b), nn.SiLU())


class Judge(nn.Module):
    """A full-resolution stem, four stride-2 stages (64 -> 4 px), then mean and max pooling.

    Max pooling lets a small object win over a large background; mean pooling keeps the context
    that tells object from background.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [width, width * 2, width * 4, width * 8, width * 8]
        self.features = nn.Sequential(_block(3, width, 1), _block(width, chans[1], 2), *[
            nn.Sequential(_block(a, a, 1), _block(a, b, 2)) for a, b in zip(chans[1:], chans[2:])
        ])  # no second conv at 64 px: it would double the cost for little gain
        self.shape_head = nn.Linear(2 * chans[-1], len(SHAPES))
        self.colour_head = nn.Linear(2 * chans[-1], len(COLOUR_NAMES))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 64, 64) in [-1, 1] -> the (B, 2C) features both heads read."""
        f = self.features(x)  # (B, C, 4, 4)
        return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, 64, 64) in [-1, 1] -> (shape logits (B, 6), colour logits (B, 8))."""
        h = self.pooled(x)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """Cosine of each image's features to the mean features of `refs` (both (B, 3, H, W) in [0, 1]):
        an image-space identity score in the spirit of the DINO / CLIP-I scores, for toy pictures."""
        def feats(x: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(x.float(), size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
            return F.normalize(self.eval().pooled(x * 2 - 1), dim=1)
        return feats(images) @ F.normalize(feats(refs).mean(0), dim=0)

    @torch.no_grad()
    def classify(self, images: list[Image.Image]) -> list[tuple[str, str]]:
        """(shape, colour) names of each picture's main object; pictures are resized to 64 px."""
        x = to_tensor([im.convert("RGB").resize((SIZE, SIZE)) for im in images])
        shape_logits, colour_logits = self.eval()(x)
        return [(SHAPES[s], COLOUR_NAMES[c]) for s, c in
                zip(shape_logits.argmax(1).tolist(), colour_logits.argmax(1).tolist())]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur (sigma up to 1.5 px), per-image tint and brightness, and pixel noise, in [-1, 1] space."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=g) * 1.5
    k = torch.arange(-3, 4, dtype=torch.float32)
    kernels = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # (B, 7)
    kernels = kernels / kernels.sum(1, keepdim=True)
    xb = x.reshape(1, b * 3, SIZE, SIZE)
    w = kernels.repeat_interleave(3, 0)  # (B*3, 7): one kernel per image, shared by its channels
    xb = F.conv2d(F.pad(xb, (3, 3, 0, 0), mode="replicate"), w[:, None, None, :], groups=b * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, 3, 3), mode="replicate"), w[:, None, :, None], groups=b * 3)
    x = xb.reshape(b, 3, SIZE, SIZE)
    x = x * (1 + 0.15 * torch.randn(b, 1, 1, 1, generator=g)) + 0.1 * torch.randn(b, 3, 1, 1, generator=g)
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _batch(step: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half train split, half held-out split, so the judge knows every (shape, colour) pair."""
    samples = [make_sample(step * size + j, seed, "train" if j % 2 else "heldout") for j in range(size)]
    return (to_tensor([s.image for s in samples]),
            torch.tensor([SHAPES.index(s.main.shape) for s in samples]),
            torch.tensor([COLOUR_NAMES.index(s.main.colour) for s in samples]))


def train_judge(steps: int = 1500, batch_size: int = 32, lr: float = 2e-3, seed: int = 1000) -> Judge:
    """Cross-entropy on both heads; the data seed differs from the base's so neither sees the other's."""
    torch.manual_seed(seed)
    judge, g = Judge(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for step in (bar := tqdm(range(steps), desc="judge")):
        x, shape, colour = _batch(step, batch_size, seed)
        shape_logits, colour_logits = judge.train()(augment(x, g))
        shape_loss, colour_loss = F.cross_entropy(shape_logits, shape), F.cross_entropy(colour_logits, colour)
        opt.zero_grad(set_to_none=True)
        (shape_loss + colour_loss).backward()
        opt.step()
        sched.step()
        bar.set_postfix(shape=f"{shape_loss.item():.3f}", colour=f"{colour_loss.item():.3f}")
    return judge.eval()


def save_judge(judge: Judge, folder: Path = JUDGE_DIR) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, folder / JUDGE_FILE)
    return folder / JUDGE_FILE


def load_judge(folder: Path | str = JUDGE_DIR) -> Judge:
    """The committed judge (safetensors only), on CPU, in eval mode."""
    path = Path(folder) / JUDGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no judge at {path}; train one with `python jobs/toy/train_judge.py`")
    judge = Judge()
    judge.load_state_dict(load_file(path))
    return judge.eval()


@dataclass(frozen=True)
class Score:
    """Accuracy of the judge's (shape, colour) against the labels each picture should show."""

    name: str
    n: int
    shape_acc: float
    colour_acc: float
    both_acc: float

    @staticmethod
    def of(name: str, predicted: list[tuple[str, str]], wanted: list[tuple[str, str]]) -> "Score":
        p, w = np.array(predicted), np.array(wanted)
        return Score(name, len(w), float((p[:, 0] == w[:, 0]).mean()), float((p[:, 1] == w[:, 1]).mean()),
                     float((p == w).all(1).mean()))


def markdown(scores: list[Score]) -> str:
    rows = [f"| {s.name} | {s.n} | {s.shape_acc:.0%} | {s.colour_acc:.0%} | {s.both_acc:.0%} |" for s in scores]
    chance = (f"| chance | | {1 / len(SHAPES):.0%} | {1 / len(COLOUR_NAMES):.0%} | "
              f"{1 / (len(SHAPES) * len(COLOUR_NAMES)):.0%} |")
    return "\n".join(["| pictures | n | shape | colour | both |", "|---|---|---|---|---|", *rows, chance])


def score_data(judge: Judge, n: int = 512, seed: int = 99) -> list[Score]:
    """The judge's own accuracy on unseen drawn pictures: the ceiling for scoring a base."""
    scores = []
    for split in ("train", "heldout"):
        samples = [make_sample(i, seed, split) for i in range(n)]
        scores.append(Score.of(f"drawn, {split} split", judge.classify([s.image for s in samples]),
                               [(s.main.shape, s.main.colour) for s in samples]))
    return scores


def generate(pipe, pairs: list[tuple[str, str]], seeds: list[int], steps: int = SAMPLE_STEPS) -> list[Image.Image]:
    """One picture per (pair, seed) from the prompt "a large {colour} {shape}", with the card's sampler."""
    return draw(pipe, [(f"a large {c} {s}", seed) for s, c in pairs for seed in seeds], steps)


def score_pairs(pipe, judge: Judge, name: str, pairs: list[tuple[str, str]], seeds: list[int],
                steps: int = SAMPLE_STEPS) -> Score:
    images = generate(pipe, pairs, seeds, steps)
    return Score.of(name, judge.classify(images), [p for p in pairs for _ in seeds])


# The (shape, colour) pairs a base is scored on: the held-out ones and as many training pairs, spread out.
SCORED_HELDOUT: list[tuple[str, str]] = sorted(HELDOUT_PAIRS)
SCORED_SEEN: list[tuple[str, str]] = list(
    TRAIN_PAIRS[:: len(TRAIN_PAIRS) // len(SCORED_HELDOUT)][: len(SCORED_HELDOUT)])


def score_base(pipe, judge: Judge, n_seeds: int = 8, seed: int = 0, steps: int = SAMPLE_STEPS) -> list[Score]:
    """The base on held-out pairs and on as many training pairs, after the judge's own ceiling."""
    seeds = list(range(seed, seed + n_seeds))
    heldout, seen = SCORED_HELDOUT, SCORED_SEEN
    return [*score_data(judge),
            score_pairs(pipe, judge, "generated, held-out pairs", heldout, seeds, steps),
            score_pairs(pipe, judge, "generated, training pairs", seen, seeds, steps)]
