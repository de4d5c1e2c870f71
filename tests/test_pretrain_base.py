"""jobs/toy/pretrain_base.py end to end, a few steps: it resumes where it stopped and exports a base
that the normal loader opens, with the model card, loss curve and sample grid beside it."""

from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from blocklora.pipeline.base import load_base
from blocklora.toy.base import GRID_PROMPTS, GRID_SEEDS, SAMPLES_FILE
from prerun import Runner

REPO = Path(__file__).resolve().parents[1]


def pretrain(run: Runner, work: Path, out: Path, steps: int, *extra: str) -> None:
    cmd = [sys.executable, "jobs/toy/pretrain_base.py", "--work-dir", str(work), "--out", str(out),
           "--steps", str(steps), "--vae-steps", "2", "--batch", "2", "--vae-batch", "2",
           "--checkpoint-every", "1", "--sample-every", "1000", "--eval-seeds", "1", "--sample-steps", "2",
           # half the committed width: the flag reaches the exported UNet, and it is faster
           "--unet-width", "16", *extra]
    done = run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]


def pretrain_then_resume_and_init_from(tmp_path: Path, run: Runner) -> int:
    """A 2-step run, then three side by side: the same work dir resumed, a new one trained on from the
    first export (--init-from; a copy, since the resumed run exports over it), and a wider one started from
    it and distilled from it (--unet-width 24 --teacher). The first run's step count."""
    work, out = tmp_path / "work", tmp_path / "base"
    pretrain(run, work, out, steps=2)
    first_steps = json.loads((work / "state.json").read_text())["unet_step"]
    shutil.copytree(out, tmp_path / "first")
    first = str(tmp_path / "first")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        resumed = pool.submit(pretrain, run, work, out, 3)  # resumes at denoiser step 2: VAE and steps 0-1 not redone
        onward = pool.submit(pretrain, run, tmp_path / "more-work", tmp_path / "more", 2,
                             "--init-from", first, "--seed", "1")
        wider = pool.submit(pretrain, run, tmp_path / "wider-work", tmp_path / "wider", 2,
                            "--init-from", first, "--unet-width", "24", "--teacher", first, "--seed", "1")
        resumed.result(), onward.result(), wider.result()
    return first_steps


@pytest.mark.slow
@pytest.mark.prerun(job=pretrain_then_resume_and_init_from)
def test_pretrain_resumes_and_exports_a_loadable_base(prerun) -> None:
    first_steps, tmp_path = prerun
    work, out, more_work, more = tmp_path / "work", tmp_path / "base", tmp_path / "more-work", tmp_path / "more"
    first = load_base(str(tmp_path / "first"), device="cpu")
    assert first_steps == 2
    assert tuple(first.pipe.unet.config.block_out_channels) == (16, 32, 64)
    rows = list(csv.DictReader((work / "loss.csv").open()))
    assert [(r["stage"], int(r["step"])) for r in rows] == [("vae", 0), ("vae", 1),
                                                             ("unet", 0), ("unet", 1), ("unet", 2)]
    second = load_base(str(out), device="cpu")
    assert second.resolution == 64 and second.fingerprint != first.fingerprint
    assert first.pipe.vae.config.scaling_factor == second.pipe.vae.config.scaling_factor  # frozen after stage 1

    card = (out / "README.md").read_text()
    assert "| 3 | 2 |" in card and all(p in card for p in GRID_PROMPTS) and "| chance |" in card
    assert "DDIM 2 steps" in card  # --sample-steps reaches the card (its default, 20, is the committed sampler)
    grid = Image.open(out / SAMPLES_FILE)
    assert grid.size == (64 * len(GRID_SEEDS), 64 * len(GRID_PROMPTS))
    assert Image.open(out / "loss.png").size[0] > 0

    # Training on from the exported base (--init-from): its VAE and latent scale are kept as they are,
    # the denoiser starts from its weights (its first loss is a trained model's, not a random one's).
    third = load_base(str(more), device="cpu")
    assert all(torch.equal(a, b)
               for a, b in zip(second.pipe.vae.state_dict().values(), third.pipe.vae.state_dict().values()))
    assert third.pipe.vae.config.scaling_factor == second.pipe.vae.config.scaling_factor
    assert third.fingerprint != second.fingerprint
    rows = list(csv.DictReader((more_work / "loss.csv").open()))
    assert [(r["stage"], int(r["step"])) for r in rows] == [("unet", 0), ("unet", 1)]
    assert f"--init-from {tmp_path / 'first'}" in (more / "README.md").read_text()

    # A wider denoiser from the same base: its VAE (and latent scale) and text encoder are kept, the UNet
    # of the new width starts from scratch and also regresses to the first base's predictions (--teacher).
    wider = load_base(str(tmp_path / "wider"), device="cpu")
    assert tuple(wider.pipe.unet.config.block_out_channels) == (24, 48, 96)
    assert all(torch.equal(a, b)
               for a, b in zip(first.pipe.vae.state_dict().values(), wider.pipe.vae.state_dict().values()))
    assert json.loads((tmp_path / "wider-work" / "state.json").read_text())["fresh_unet"] is True
    card = (tmp_path / "wider" / "README.md").read_text()
    assert "the denoiser (width 24, wider than the initial base's) trained from scratch" in card
    assert f"Distilled from `{tmp_path / 'first'}`" in card and "--teacher" in card

    from blocklora.toy.pretrain import Run
    with pytest.raises(ValueError, match="already holds a run"):  # a work dir belongs to one starting point
        Run(more_work).start_from(tmp_path, vae_steps=2, unet_width=16)
    with pytest.raises(ValueError, match="not an exported toy base: no vae, unet, text_encoder"):
        Run(tmp_path / "fresh").start_from(tmp_path / "fresh", vae_steps=2, unet_width=16)


def test_worker_processes_draw_the_same_batches() -> None:
    """A GPU run draws batches in worker processes; a resumed CPU run must see the very same stream."""
    from blocklora.toy.pretrain import batches

    alone, workers = list(batches(3, 7, 4, 0, 0)), list(batches(3, 7, 4, 0, 2))
    assert [s for s, _, _ in alone] == [s for s, _, _ in workers] == [3, 4, 5, 6]
    assert all(torch.equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(alone, workers))
