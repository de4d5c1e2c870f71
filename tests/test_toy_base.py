"""The committed toy base: loads offline by any path, is what it claims, and draws what it is asked."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the network

import numpy as np
import pytest
from PIL import Image

from blocklora.pipeline.base import Base, load_base
from blocklora.toy.base import GRID_PROMPTS, SAMPLES_FILE, TOY_BASE_DIR, sample_grid
from blocklora.toy.data import HELDOUT_PAIRS
from blocklora.toy.judge import Score, generate, load_judge
from blocklora.toy.vocabulary import SHAPES
from prerun import Runner

REPO = TOY_BASE_DIR.parents[1]
# fixed pairs, two of them held out of training (never captioned together); the model card has the full evaluation
PAIRS = [("square", "blue"), ("circle", "yellow"), ("heart", "red")]
SEEDS = list(range(8))
MAX_BYTES = 40 * 2**20


@pytest.fixture(scope="module")
def base() -> Base:
    return load_base(str(TOY_BASE_DIR), device="cpu")


def test_committed_weights_are_small_safetensors() -> None:
    files = [p for p in (REPO / "models").rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    assert sum(p.stat().st_size for p in weights) <= MAX_BYTES


def test_architecture_fits_blocklora(base: Base) -> None:
    pipe = base.pipe
    assert base.resolution == 64
    assert len(pipe.tokenizer) == 49408 and pipe.text_encoder.config.hidden_size >= 32
    assert pipe.unet.config.cross_attention_dim >= 16
    projections = [m for n, m in pipe.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert projections and min(m.out_features for m in projections) >= 16


def fingerprint_in_a_fresh_process(folder: Path, run: Runner) -> str:
    """A fresh offline process loading the toy base by a path relative to the repository."""
    rel = os.path.relpath(TOY_BASE_DIR, REPO)
    code = f"from blocklora.pipeline.base import load_base; print(load_base({rel!r}, device='cpu').fingerprint)"
    out = run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.prerun(job=fingerprint_in_a_fresh_process)
def test_fingerprint_same_across_loads_and_paths(base: Base, prerun) -> None:
    """A second load in-process, and a fresh offline process loading by a relative path, agree."""
    assert load_base(str(TOY_BASE_DIR), device="cpu").fingerprint == base.fingerprint
    fresh, _ = prerun
    assert fresh == base.fingerprint


def test_judge_finds_the_prompted_colour_and_beats_chance_on_shape(base: Base) -> None:
    """Colour at the issue's aim (>= 80%), shape above chance (1/6). Shape is the weak part: the base
    draws most shapes as rounded blobs, which the judge calls circles, so the circle prompt carries
    the shape score (models/toy-base/README.md has the full evaluation)."""
    assert len(set(PAIRS) & HELDOUT_PAIRS) == 2
    images = generate(base.pipe, PAIRS, SEEDS)
    score = Score.of("fixed prompts", load_judge().classify(images), [p for p in PAIRS for _ in SEEDS])
    assert score.colour_acc >= 0.8 and score.shape_acc > 1 / len(SHAPES), score


def test_card_sample_grid_redraws_from_its_prompts_and_seeds(base: Base) -> None:
    """The committed samples.png is what the committed weights draw from the card's prompts and seeds.

    Tolerances allow for float reassociation on other CPUs (20 DDIM steps can amplify last-bit
    differences); a different base or sampler moves the mean by tens of levels.
    """
    card = (TOY_BASE_DIR / "README.md").read_text()
    assert all(f"`{p}`" in card for p in GRID_PROMPTS)
    committed = np.asarray(Image.open(TOY_BASE_DIR / SAMPLES_FILE).convert("RGB"), dtype=np.float32)
    redrawn = np.asarray(sample_grid(base.pipe), dtype=np.float32)
    assert redrawn.shape == committed.shape
    diff = np.abs(redrawn - committed)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) < 8, (diff.mean(), np.percentile(diff, 99))
