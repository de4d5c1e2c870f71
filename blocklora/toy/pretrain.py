"""Pretraining the toy base from scratch on blocklora.toy.data: the VAE, then UNet + text encoder.

Two stages share one work dir: the VAE learns to reconstruct toy pictures, is frozen, and the
denoiser and text encoder then learn on its latents. Every checkpoint is safetensors plus a JSON
state, and data and noise are drawn from (seed, step), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save as safetensors_bytes
from tqdm import tqdm
from transformers import CLIPTextModel

from blocklora.config import PretrainConfig
from blocklora.files.atomic import atomic_write
from blocklora.files.checkpoint import load_optimizer_tensors, optimizer_tensors
from blocklora.toy.architecture import SCHEDULE, build_pipeline, build_text_encoder, build_unet, build_vae
from blocklora.toy.base import sample_grid
from blocklora.toy.data import make_sample
from blocklora.toy.draw import to_tensor

DROP_CAPTION = 0.1  # share of empty captions, so classifier-free guidance has an unconditional model


def batch(step: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Training batch `step`: the stream's samples [step*size, (step+1)*size), so resumes repeat nothing."""
    samples = [make_sample(step * size + j, seed, "train") for j in range(size)]
    return to_tensor([s.image for s in samples]), [s.caption for s in samples]


class _Batches(torch.utils.data.Dataset):
    """Batch `step` at index `step`: worker processes draw ahead while the device trains."""

    def __init__(self, steps: int, size: int, seed: int) -> None:
        self.steps, self.size, self.seed = steps, size, seed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, list[str]]:
        return batch(step, self.size, self.seed)


def batches(start: int, steps: int, size: int, seed: int,
            workers: int) -> Iterator[tuple[int, torch.Tensor, list[str]]]:
    """(step, pixels, captions) for steps [start, steps), the same whatever `workers` is."""
    loader = torch.utils.data.DataLoader(
        _Batches(steps, size, seed), batch_size=None, sampler=range(start, steps), num_workers=workers,
        prefetch_factor=4 if workers else None, persistent_workers=False)
    for i, (x, captions) in enumerate(loader):
        yield start + i, x, captions


class Run:
    """The work dir: modules' weights, optimizer moments, progress and the loss log of one run."""

    def __init__(self, work: Path, device: str = "cpu") -> None:
        self.work = work
        dev = torch.device(device)  # named on the model card: where each segment of the run trained
        self.device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                            else f"{dev.type} ({torch.get_num_threads()} threads)")
        work.mkdir(parents=True, exist_ok=True)
        state_path = work / "state.json"
        self.state = json.loads(state_path.read_text()) if state_path.exists() else {
            "vae_step": 0, "unet_step": 0, "wall_seconds": 0.0}
        self._t0 = time.time()
        self._forget_uncheckpointed_losses()

    def start_from(self, base_dir: Path, vae_steps: int, unet_width: int) -> None:
        """Seed an empty work dir with an exported toy base: its VAE (and latent scale) count as stage 1
        done, and the text encoder trains on from its weights with fresh optimizer moments. The denoiser
        trains on from the base's too when it has `unet_width`; a wider one starts from scratch (more rows
        per slot, docs/results: concept capacity) on the kept VAE latents and the kept text encoder."""
        base_dir = Path(base_dir)
        if (self.work / "state.json").exists():
            if self.state.get("init_from") != str(base_dir):
                raise ValueError(f"{self.work} already holds a run (initialised from {self.state.get('init_from')}); "
                                 f"use a new --work-dir to start from {base_dir}")
            return
        missing = [m for m in ("vae", "unet", "text_encoder") if not (base_dir / m).is_dir()]
        if missing:
            raise ValueError(f"{base_dir} is not an exported toy base: no {', '.join(missing)} folder")
        vae = AutoencoderKL.from_pretrained(base_dir / "vae")
        kept: dict[str, torch.nn.Module] = {"vae": vae,
                                            "text_encoder": CLIPTextModel.from_pretrained(base_dir / "text_encoder")}
        base_width = UNet2DConditionModel.load_config(base_dir / "unet")["block_out_channels"][0]
        if base_width == unet_width:
            kept["unet"] = UNet2DConditionModel.from_pretrained(base_dir / "unet")
        self._save_weights(kept)
        self.state.update(vae_step=vae_steps, init_from=str(base_dir), latent_scale=vae.config.scaling_factor,
                          fresh_unet=base_width != unet_width)
        atomic_write(self.work / "state.json", json.dumps(self.state, indent=1).encode())

    def _forget_uncheckpointed_losses(self) -> None:
        """Drop log rows past the last checkpoint: a resumed run logs those steps again."""
        path = self.work / "loss.csv"
        if path.exists():
            lines = path.read_text().splitlines(keepends=True)
            keep = [ln for ln in lines[1:] if int(ln.split(",")[1]) < self.state[ln.split(",")[0] + "_step"]]
            atomic_write(path, "".join(lines[:1] + keep).encode())

    def _save_weights(self, modules: dict[str, torch.nn.Module]) -> None:
        for name, mod in modules.items():
            tensors = {k: v.contiguous() for k, v in mod.state_dict().items()}
            atomic_write(self.work / f"{name}.safetensors", safetensors_bytes(tensors))

    def checkpoint(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, stage: str) -> None:
        self._save_weights(modules)
        atomic_write(self.work / f"opt_{stage}.safetensors", safetensors_bytes(optimizer_tensors(opt)))
        now = time.time()
        self.state["trained_on"] = sorted({*self.state.get("trained_on", []), self.device_name})
        self.state["wall_seconds"] += now - self._t0
        self._t0 = now
        # weights first, state last: a crash never skips ahead
        atomic_write(self.work / "state.json", json.dumps(self.state, indent=1).encode())

    def restore(self, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer | None, stage: str) -> None:
        for name, mod in modules.items():
            if (self.work / f"{name}.safetensors").exists():
                mod.load_state_dict(load_file(self.work / f"{name}.safetensors"))
        if opt is not None and (self.work / f"opt_{stage}.safetensors").exists():
            load_optimizer_tensors(opt, load_file(self.work / f"opt_{stage}.safetensors"))

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


def train_vae(run: Run, vae: AutoencoderKL, steps: int, batch_size: int, seed: int, every: int,
              workers: int) -> None:
    """L1 + MSE reconstruction and a tiny KL: a near-deterministic autoencoder with a smooth latent."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    run.restore({"vae": vae}, opt, "vae")
    vae.train()
    dev = vae.device
    start = run.state["vae_step"]
    stream = batches(start, steps, batch_size, seed + 1, workers)  # a different stream from the denoiser's
    for step, x, _ in tqdm(stream, desc="vae", initial=start, total=steps):
        cosine_lr(opt, 1e-3, step, steps)
        x = x.to(dev)
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(seed * 100003 + step))
        y = vae.decode(post.mean + post.std * eps.to(dev)).sample
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
    std = vae.encode(x.to(vae.device)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


def min_snr_weights(sched: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al., 2023): min(SNR, gamma) / SNR.

    Nearly clean timesteps (high SNR) are easy and dominate an unweighted loss, yet layout, shape
    and colour are decided at the noisy end; capping their weight spends the few CPU steps there.
    """
    if gamma <= 0:
        return torch.ones(len(t), device=t.device)
    ac = sched.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    return snr.clamp(max=gamma) / snr


class Teacher:
    """An exported toy base's frozen denoiser and text encoder: what it predicts for the very noisy
    latents the student sees. Its prediction approximates E[eps | x_t, caption], a far less noisy target
    than the sampled eps, so a new (e.g. wider) denoiser learns to draw what it draws in fewer steps."""

    def __init__(self, base_dir: Path, device: str) -> None:
        base_dir = Path(base_dir)
        self.unet = UNet2DConditionModel.from_pretrained(base_dir / "unet").to(device).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(base_dir / "text_encoder").to(device).eval()
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)

    @torch.no_grad()
    def predict(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, t, self.text_encoder(ids).last_hidden_state).sample


def train_denoiser(run: Run, pipe: StableDiffusionPipeline, steps: int, batch_size: int, lr: float,
                   seed: int, every: int, sample_every: int, sample_steps: int, snr_gamma: float, workers: int,
                   teacher: Teacher | None = None, teacher_weight: float = 0.0) -> None:
    """Epsilon prediction with the SD noise schedule; text encoder trained jointly from scratch. With a
    teacher, the loss adds `teacher_weight` x the MSE to its prediction (the log keeps the data term, so
    runs with and without a teacher compare)."""
    unet, te, tok, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    noise_sched = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    run.restore({"unet": unet, "text_encoder": te}, opt, "unet")
    unet.train()
    te.train()
    dev = unet.device
    start = run.state["unet_step"]
    for step, x, captions in tqdm(batches(start, steps, batch_size, seed, workers), desc="unet", initial=start,
                                  total=steps):
        cosine_lr(opt, lr, step, steps)
        # Noise, timesteps and caption drops come from a CPU generator: the same run on any device.
        g = torch.Generator().manual_seed(seed * 100003 + step)
        drop = torch.rand(batch_size, generator=g) < DROP_CAPTION
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            post = vae.encode(x.to(dev)).latent_dist
            eps = torch.randn(post.mean.shape, generator=g).to(dev)
            latents = (post.mean + post.std * eps) * vae.config.scaling_factor  # (B, 4, 16, 16)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(dev)
        noise = torch.randn(latents.shape, generator=g).to(dev)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g).to(dev)
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, te(ids).last_hidden_state).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        weights = min_snr_weights(noise_sched, t, snr_gamma)
        loss = (weights * per_sample).mean()
        total = loss
        if teacher is not None:
            to_teacher = F.mse_loss(pred, teacher.predict(noisy, t, ids), reduction="none").mean(dim=(1, 2, 3))
            total = loss + teacher_weight * (weights * to_teacher).mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.log("unet", step, loss.item())
        run.state["unet_step"] = step + 1
        if (step + 1) % every == 0 or step + 1 == steps:
            run.checkpoint({"unet": unet, "text_encoder": te}, opt, "unet")
        if (step + 1) % sample_every == 0:
            # no dropout/BN: train or eval mode is moot
            sample_grid(pipe, sample_steps).save(run.work / f"samples_{step + 1:06d}.png")
    unet.eval()
    te.eval()


def pretrain(cfg: PretrainConfig, work_dir: Path, init_from: Path | None = None
             ) -> tuple[StableDiffusionPipeline, Run, float]:
    """Both stages, resuming from `work_dir`: the trained pipeline, its run and the latent scale.
    With `init_from` (an exported toy base) the run starts from its weights: see `Run.start_from`.

    A finished run trains nothing again; it only rebuilds the pipeline from its checkpoints."""
    torch.manual_seed(cfg.seed)
    # the initial weights drawn from the seed, in this order
    vae, unet, te = build_vae(), build_unet(cfg.unet_width), build_text_encoder()
    for m in (vae, unet, te):
        m.to(cfg.device)
    run = Run(work_dir, cfg.device)
    if init_from is not None:
        run.start_from(init_from, cfg.vae_steps, cfg.unet_width)
    train_vae(run, vae, cfg.vae_steps, cfg.vae_batch, cfg.seed, cfg.checkpoint_every, cfg.data_workers)
    if "latent_scale" in run.state:  # the initial base's: its denoiser learned on latents at that scale
        vae.register_to_config(scaling_factor=run.state["latent_scale"])
        scale = run.state["latent_scale"]
    else:
        scale = set_latent_scale(vae, cfg.seed)
    pipe = build_pipeline(vae, unet, te)
    teacher = Teacher(Path(cfg.teacher), cfg.device) if cfg.teacher else None
    train_denoiser(run, pipe, cfg.steps, cfg.batch, cfg.lr, cfg.seed, cfg.checkpoint_every, cfg.sample_every,
                   cfg.sample_steps, cfg.snr_gamma, cfg.data_workers, teacher, cfg.teacher_weight)
    return pipe, run, scale
