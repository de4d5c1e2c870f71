"""Pretrain the toy base (VAE, then UNet + CLIP text encoder) on blocklora.toy.data, on a CPU.

Two stages share one work dir: the VAE learns to reconstruct toy pictures, is frozen, and the
denoiser and text encoder then learn on its latents. Every checkpoint is safetensors plus a JSON
state, and data and noise are drawn from (seed, step), so a killed run resumes where it stopped and
re-running a finished run only re-exports the pipeline and rewrites the model card.

    python jobs/pretrain_base.py --work-dir /tmp/toy-base-work
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a plain script

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from blocklora.tokenizer import VOCAB_SIZE, clip_tokenizer
from blocklora.toy.base import GRID_PROMPTS, GRID_SEEDS, GUIDANCE, SAMPLE_STEPS, SAMPLES_FILE, TOY_BASE_DIR, sample_grid
from blocklora.toy.data import SIZE, make_sample, to_tensor

matplotlib.use("Agg")

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
DROP_CAPTION = 0.1  # share of empty captions, so classifier-free guidance has an unconditional model


def build_vae() -> AutoencoderKL:
    """4x downscale (64 px -> 16x16x4 latents): flat-coloured shapes need little detail.

    One norm group: with one channel per group, GroupNorm is instance norm, which erases a flat
    picture's colour; the VAE then paints blob artifacts to smuggle it past the norm.
    """
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=1, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def build_unet() -> UNet2DConditionModel:
    """Cross-attention at every level; the narrowest projection still has 32 >= 16 rows for slots."""
    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
    )


def build_text_encoder() -> CLIPTextModel:
    """Full 49,408-row embedding so the real CLIP tokenizer (and concepts' new tokens) fit."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=64,
    ))


def build_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> StableDiffusionPipeline:
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def batch(step: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Training batch `step`: the stream's samples [step*size, (step+1)*size), so resumes repeat nothing."""
    samples = [make_sample(step * size + j, seed, "train") for j in range(size)]
    return to_tensor([s.image for s in samples]), [s.caption for s in samples]


def save_optimizer(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam moments flattened to "<param index>.<name>" so they fit in a safetensors file."""
    return {f"{i}.{k}": v.reshape(1) if v.dim() == 0 else v
            for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def load_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class Run:
    """The work dir: modules' weights, optimizer moments, progress and the loss log of one run."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        state_path = work / "state.json"
        self.state = json.loads(state_path.read_text()) if state_path.exists() else {
            "vae_step": 0, "unet_step": 0, "wall_seconds": 0.0}
        self._t0 = time.time()
        self._forget_uncheckpointed_losses()

    def _forget_uncheckpointed_losses(self) -> None:
        """Drop log rows past the last checkpoint: a resumed run logs those steps again."""
        path = self.work / "loss.csv"
        if path.exists():
            lines = path.read_text().splitlines(keepends=True)
            keep = [ln for ln in lines[1:] if int(ln.split(",")[1]) < self.state[ln.split(",")[0] + "_step"]]
            path.write_text("".join(lines[:1] + keep))

    def checkpoint(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, stage: str) -> None:
        for name, mod in modules.items():
            save_file({k: v.contiguous() for k, v in mod.state_dict().items()}, self.work / f"{name}.safetensors")
        save_file(save_optimizer(opt), self.work / f"opt_{stage}.safetensors")
        now = time.time()
        self.state["wall_seconds"] += now - self._t0
        self._t0 = now
        tmp = self.work / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.work / "state.json")  # weights first, state last: a crash never skips ahead

    def restore(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer | None, stage: str) -> None:
        for name, mod in modules.items():
            if (self.work / f"{name}.safetensors").exists():
                mod.load_state_dict(load_file(self.work / f"{name}.safetensors"))
        if opt is not None and (self.work / f"opt_{stage}.safetensors").exists():
            load_optimizer(opt, load_file(self.work / f"opt_{stage}.safetensors"))

    def log(self, stage: str, step: int, loss: float) -> None:
        path = self.work / "loss.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["stage", "step", "loss", "wall_seconds"])
            w.writerow([stage, step, f"{loss:.5f}", f"{self.state['wall_seconds'] + time.time() - self._t0:.1f}"])


def cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 100) -> None:
    """Warm up, then decay to 0: the last steps average out noise much as an EMA would, without a copy."""
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(step, total) / total))
    for g in opt.param_groups:
        g["lr"] = lr


def train_vae(run: Run, vae: AutoencoderKL, steps: int, batch_size: int, seed: int, every: int) -> None:
    """L1 + MSE reconstruction and a tiny KL: a near-deterministic autoencoder with a smooth latent."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    run.restore({"vae": vae}, opt, "vae")
    vae.train()
    for step in tqdm(range(run.state["vae_step"], steps), desc="vae", initial=run.state["vae_step"], total=steps):
        cosine_lr(opt, 1e-3, step, steps)
        x, _ = batch(step, batch_size, seed + 1)  # a different stream from the denoiser's
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample(torch.Generator().manual_seed(seed * 100003 + step))).sample
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.log("vae", step, loss.item())
        run.state["vae_step"] = step + 1
        if (step + 1) % every == 0 or step + 1 == steps:
            run.checkpoint({"vae": vae}, opt, "vae")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, seed: int, n: int = 512) -> float:
    """SD's convention: scale latents to unit variance, measured on data the VAE never saw."""
    x, _ = batch(10**6, n, seed + 1)
    std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


def min_snr_weights(sched: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al., 2023): min(SNR, gamma) / SNR.

    Nearly clean timesteps (high SNR) are easy and dominate an unweighted loss, yet layout, shape
    and colour are decided at the noisy end; capping their weight spends the few CPU steps there.
    """
    if gamma <= 0:
        return torch.ones(len(t))
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    return snr.clamp(max=gamma) / snr


def train_denoiser(run: Run, pipe: StableDiffusionPipeline, steps: int, batch_size: int, lr: float,
                   seed: int, every: int, sample_every: int, snr_gamma: float) -> None:
    """Epsilon prediction with the SD noise schedule; text encoder trained jointly from scratch."""
    unet, te, tok, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    noise_sched = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    run.restore({"unet": unet, "text_encoder": te}, opt, "unet")
    unet.train()
    te.train()
    for step in tqdm(range(run.state["unet_step"], steps), desc="unet", initial=run.state["unet_step"], total=steps):
        cosine_lr(opt, lr, step, steps)
        g = torch.Generator().manual_seed(seed * 100003 + step)
        x, captions = batch(step, batch_size, seed)
        drop = torch.rand(batch_size, generator=g) < DROP_CAPTION
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(g) * vae.config.scaling_factor  # (B, 4, 16, 16)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, te(ids).last_hidden_state).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (min_snr_weights(noise_sched, t, snr_gamma) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.log("unet", step, loss.item())
        run.state["unet_step"] = step + 1
        if (step + 1) % every == 0 or step + 1 == steps:
            run.checkpoint({"unet": unet, "text_encoder": te}, opt, "unet")
        if (step + 1) % sample_every == 0:
            sample_grid(pipe).save(run.work / f"samples_{step + 1:06d}.png")  # no dropout/BN: mode is moot
    unet.eval()
    te.eval()


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
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    finals = {}
    for ax, stage in zip(axes, ("vae", "unet")):
        loss = np.array([float(r["loss"]) for r in rows if r["stage"] == stage])
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


def command(args: argparse.Namespace) -> str:
    """The flags that decide the weights, as they were set: what to type to train this base again."""
    keys = ("steps", "batch", "lr", "snr_gamma", "vae_steps", "vae_batch", "seed", "threads")
    return " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in keys)


def write_card(out: Path, pipe: StableDiffusionPipeline, args: argparse.Namespace, run: Run, scale: float,
               finals: dict[str, float], scores: str, grids: int) -> None:
    n_params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                for name in ("vae", "unet", "text_encoder")}
    grid_rows = "\n".join(f"{i + 1}. `{p}`" for i, p in enumerate(GRID_PROMPTS))
    progress = (f"\nDuring training (`progress.png`): seed 0 of the same prompts after every {args.sample_every}"
                f" denoiser steps ({grids} grids), labelled with the step.\n\n![progress](progress.png)\n"
                if grids else "")
    (out / "README.md").write_text(f"""# toy-base: blocklora's own tiny text-to-image base

Stable-Diffusion-shaped (AutoencoderKL + UNet2DConditionModel with cross-attention + CLIPTextModel with
the real CLIP tokenizer, 49,408 tokens), pretrained from scratch on a CPU so the project has a base that
draws something a person can judge. Written by `jobs/pretrain_base.py`; every number below comes from it.

## Data
`blocklora.toy.data`: procedural 64x64 pictures of {{circle, square, triangle, star, cross, heart}} in 8
colours, small or large, one or two objects, on plain, striped or dotted backgrounds, with captions such
as "a small red star on a blue background" (size and background are each omitted from 30% of captions;
{DROP_CAPTION:.0%} of captions are dropped entirely, for classifier-free guidance). Six (shape, colour)
pairs are held out of training (`blocklora.toy.data.HELDOUT_PAIRS`).

## Training (seed {args.seed}, {args.threads} CPU thread(s))
| stage | steps | batch | final loss (50-step mean) |
|---|---|---|---|
| VAE (L1+MSE+1e-6 KL) | {args.vae_steps} | {args.vae_batch} | {finals['vae']:.4f} |
| UNet + text encoder (epsilon MSE, min-SNR-{args.snr_gamma:g} weighted) | {args.steps} | {args.batch} | {finals['unet']:.4f} |

Command: `python jobs/pretrain_base.py {command(args)} --work-dir <dir>`

Wall time: {run.state['wall_seconds'] / 60:.1f} min, summed over the run's segments up to their last
checkpoints, on a 2-core machine shared with other jobs. Latent scaling factor {scale:.4f}.
{args.note}
Parameters: VAE {n_params['vae'] / 1e6:.2f} M, UNet {n_params['unet'] / 1e6:.2f} M, text encoder
{n_params['text_encoder'] / 1e6:.2f} M (of which {pipe.text_encoder.get_input_embeddings().weight.numel() / 1e6:.2f} M token embeddings).

![loss](loss.png)

## Samples
`samples.png`: DDIM {SAMPLE_STEPS} steps, guidance {GUIDANCE}, one row per prompt, columns are seeds
{list(GRID_SEEDS)} (`torch.Generator().manual_seed(seed)`, one per image):

{grid_rows}

Rows 7 and 8 (orange circle, blue square) are held-out pairs, never seen in training.

![samples](samples.png)
{progress}
## Judge scores
{scores}

## Load
```python
from blocklora.base import load_base
from blocklora.toy.base import TOY_BASE_DIR
base = load_base(str(TOY_BASE_DIR))
```
""")


def judge_scores(pipe: StableDiffusionPipeline, n_seeds: int, seed: int) -> str:
    """Markdown table of the judge on the exported base, or a note when no judge is trained yet."""
    from blocklora.toy.judge import JUDGE_DIR, JUDGE_FILE, load_judge, markdown, score_base

    if not (JUDGE_DIR / JUDGE_FILE).exists():
        return "No judge trained yet (run `jobs/train_judge.py`, then re-run this script to fill this in)."
    return (f"Prompts `a large {{colour}} {{shape}}`, {n_seeds} seeds per pair, same sampler as above; the first\n"
            "two rows are the judge on drawn pictures (its ceiling).\n\n"
            + markdown(score_base(pipe, load_judge(), n_seeds=n_seeds, seed=seed)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=9000, help="UNet + text encoder optimizer steps")
    ap.add_argument("--batch", type=int, default=16, help="denoiser batch size")
    ap.add_argument("--lr", type=float, default=1e-3, help="denoiser peak learning rate")
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR loss weighting cap (0: plain MSE)")
    ap.add_argument("--vae-steps", type=int, default=1500, help="VAE optimizer steps (stage 1)")
    ap.add_argument("--vae-batch", type=int, default=32, help="VAE batch size")
    ap.add_argument("--out", type=Path, default=TOY_BASE_DIR, help="diffusers folder to export to")
    ap.add_argument("--work-dir", type=Path, default=Path("work/toy-base"), help="checkpoints and logs")
    ap.add_argument("--seed", type=int, default=0, help="weights, data stream and noise all derive from it")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    ap.add_argument("--sample-every", type=int, default=1000, help="denoiser steps between sample grids")
    ap.add_argument("--eval-seeds", type=int, default=8, help="judge pictures per (shape, colour) pair in the card")
    ap.add_argument("--note", default="", help="text for the model card, e.g. what changed when a run was resumed")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae, unet, te = build_vae(), build_unet(), build_text_encoder()  # init drawn from the seed, in this order
    run = Run(args.work_dir)
    train_vae(run, vae, args.vae_steps, args.vae_batch, args.seed, args.checkpoint_every)
    scale = set_latent_scale(vae, args.seed)
    pipe = build_pipeline(vae, unet, te)
    train_denoiser(run, pipe, args.steps, args.batch, args.lr, args.seed, args.checkpoint_every, args.sample_every,
                   args.snr_gamma)

    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    finals = plot_loss(run.work / "loss.csv", args.out / "loss.png")
    sample_grid(pipe).save(args.out / SAMPLES_FILE)
    grids = progress_strip(run.work, args.out / "progress.png")
    write_card(args.out, pipe, args, run, scale, finals, judge_scores(pipe, args.eval_seeds, args.seed), grids)
    print(f"exported to {args.out} ({run.state['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
