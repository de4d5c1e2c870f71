"""The toy base's model card: loss curves, a strip of sample grids over training, judge scores, and
the README.md that shows them beside the exported weights, with the command that made them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from diffusers import StableDiffusionPipeline

from blocklora.config import PretrainConfig, to_argv
from blocklora.toy.base import GRID_PROMPTS, GRID_SEEDS, GUIDANCE, SAMPLES_FILE, sample_grid
from blocklora.toy.draw import SIZE
from blocklora.toy.pretrain import DROP_CAPTION, Run


def progress_strip(work: Path, png: Path) -> int:
    """Seed 0 of every grid prompt at each saved sample grid, side by side: how drawing emerged.
    Returns how many grids there were (0: nothing written)."""
    from PIL import Image, ImageDraw

    grids = sorted(work.glob("samples_*.png"))
    if not grids:
        return 0
    cell, top = SIZE, 12
    strip = Image.new("RGB", (len(grids) * (cell + 2), top + cell * len(GRID_PROMPTS)), "white")
    draw = ImageDraw.Draw(strip)
    for i, path in enumerate(grids):
        column = Image.open(path).convert("RGB").crop((0, 0, cell, cell * len(GRID_PROMPTS)))
        strip.paste(column, (i * (cell + 2), top))
        draw.text((i * (cell + 2) + 2, 0), str(int(path.stem.split("_")[1])), fill="black")
    strip.save(png)
    return len(grids)


def plot_loss(csv_path: Path, png: Path) -> dict[str, float]:
    """Loss curves of both stages (smoothed over 50 steps); returns each stage's final smoothed loss."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    finals = {}
    for ax, stage in zip(axes, ("vae", "unet")):
        loss = np.array([float(r["loss"]) for r in rows if r["stage"] == stage])
        if not len(loss):  # a run started from an exported base (--init-from) kept its VAE
            ax.set(title=f"{stage}: taken from the initial base")
            ax.axis("off")
            continue
        k = min(50, len(loss))
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(loss, alpha=0.3, lw=0.6)
        ax.plot(np.arange(k - 1, len(loss)), smooth, lw=1.5)
        ax.set(title=f"{stage} loss", xlabel="step", yscale="log")
        finals[stage] = float(smooth[-1])
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return finals


def command(cfg: PretrainConfig) -> str:
    """The flags that decide the weights, as they were set: what to type to train this base again."""
    return " ".join(to_argv(cfg, skip=("checkpoint_every", "sample_every", "eval_seeds", "sample_steps", "note",
                                       "threads", "device", "data_workers")))


def write_card(out: Path, pipe: StableDiffusionPipeline, cfg: PretrainConfig, run: Run, scale: float,
               finals: dict[str, float], scores: str, grids: int) -> None:
    n_params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                for name in ("vae", "unet", "text_encoder")}
    grid_rows = "\n".join(f"{i + 1}. `{p}`" for i, p in enumerate(GRID_PROMPTS))
    progress = (f"\nDuring training (`progress.png`): seed 0 of the same prompts after every {cfg.sample_every}"
                f" denoiser steps ({grids} grids), labelled with the step.\n\n![progress](progress.png)\n"
                if grids else "")
    init = run.state.get("init_from")
    vae_row = (f"| VAE (L1+MSE+1e-6 KL) | {cfg.vae_steps} | {cfg.vae_batch} | {finals['vae']:.4f} |" if not init else
               f"| VAE | kept from the initial base `{init}` (latent scale too) | | |")
    trained_on = ("the text encoder trained on and the denoiser (width "
                  f"{cfg.unet_width}, wider than the initial base's) trained from scratch"
                  if run.state.get("fresh_unet") else "the denoiser and text encoder trained on")
    started = (f"Started from the exported base `{init}`: {trained_on} for the steps in the table above,"
               " fresh AdamW moments, on the data stream of the seed above.\n" if init else "")
    if cfg.teacher:
        started += (f"Distilled from `{cfg.teacher}`: the loss adds {cfg.teacher_weight:g} x the (min-SNR weighted) "
                    "MSE to its denoiser's prediction; the loss column above is the data term alone.\n")
    (out / "README.md").write_text(f"""# toy-base: blocklora's own tiny text-to-image base

Stable-Diffusion-shaped (AutoencoderKL + UNet2DConditionModel with cross-attention + CLIPTextModel with
the real CLIP tokenizer, 49,408 tokens), pretrained from scratch (a run sized for this project's 2-core
CPU machine) so the project has a base that draws something a person can judge. Written by \
`jobs/toy/pretrain_base.py`; every number below comes from it.

## Data
`blocklora.toy.data`: procedural 64x64 pictures of {{circle, square, triangle, star, cross, heart}} in 8
colours, small or large, one or two objects, on plain, striped or dotted backgrounds, with captions such
as "a small red star on a blue background". Half the main objects are dressed (`blocklora.toy.draw.Dress`):
a second fill colour in stripes, dots or checks, an outline and a centre disc, which captions never name, so
the base can draw any dress but no words ask for one (a concept is one dress on one shape, and the
benchmark concepts' dresses are never drawn). Size and background are each omitted from 30% of captions;
{DROP_CAPTION:.0%} of captions are dropped entirely, for classifier-free guidance). Six (shape, colour)
pairs are held out of training (`blocklora.toy.data.HELDOUT_PAIRS`).

## Training (seed {cfg.seed}, on {", ".join(run.state.get("trained_on", ["cpu"]))})
| stage | steps | batch | final loss (50-step mean) |
|---|---|---|---|
{vae_row}
| UNet + text encoder (epsilon MSE, min-SNR-{cfg.snr_gamma:g} weighted) | {cfg.steps} | {cfg.batch} | \
{finals['unet']:.4f} |

{started}Command: `python jobs/toy/pretrain_base.py {command(cfg)}{f" --init-from {init}" if init else ""} \
--work-dir <dir>`

Wall time: {run.state['wall_seconds'] / 60:.1f} min, summed over the run's segments up to their last
checkpoints, on the device(s) named above. Latent scaling factor {scale:.4f}.
{cfg.note}
Parameters: VAE {n_params['vae'] / 1e6:.2f} M, UNet {n_params['unet'] / 1e6:.2f} M, text encoder
{n_params['text_encoder'] / 1e6:.2f} M (of which \
{pipe.text_encoder.get_input_embeddings().weight.numel() / 1e6:.2f} M token embeddings).

![loss](loss.png)

## Samples
`samples.png`: DDIM {cfg.sample_steps} steps, guidance {GUIDANCE}, one row per prompt, columns are seeds
{list(GRID_SEEDS)} (`torch.Generator().manual_seed(seed)`, one per image):

{grid_rows}

Rows 7 and 8 (orange circle, blue square) are held-out pairs, never seen in training.

![samples](samples.png)
{progress}
## Judge scores
{scores}

## Load
```python
from blocklora.pipeline.base import load_base
from blocklora.toy.base import TOY_BASE_DIR
base = load_base(str(TOY_BASE_DIR))
```
""")


def judge_scores(pipe: StableDiffusionPipeline, n_seeds: int, seed: int, steps: int) -> str:
    """Markdown table of the judge on the exported base, or a note when no judge is trained yet."""
    from blocklora.toy.judge import JUDGE_DIR, JUDGE_FILE, load_judge, markdown, score_base

    if not (JUDGE_DIR / JUDGE_FILE).exists():
        return "No judge trained yet (run `jobs/toy/train_judge.py`, then re-run this script to fill this in)."
    return (f"Prompts `a large {{colour}} {{shape}}`, {n_seeds} seeds per pair, same sampler as above; the first\n"
            "two rows are the judge on drawn pictures (its ceiling).\n\n"
            + markdown(score_base(pipe, load_judge(), n_seeds=n_seeds, seed=seed, steps=steps)))


def export(out: Path, pipe: StableDiffusionPipeline, cfg: PretrainConfig, run: Run, scale: float) -> None:
    """The diffusers folder `out`: weights, then the card's pictures (loss, samples, progress) and README."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    finals = plot_loss(run.work / "loss.csv", out / "loss.png")
    sample_grid(pipe, cfg.sample_steps).save(out / SAMPLES_FILE)
    grids = progress_strip(run.work, out / "progress.png")
    scores = judge_scores(pipe, cfg.eval_seeds, cfg.seed, cfg.sample_steps)
    write_card(out, pipe, cfg, run, scale, finals, scores, grids)
