"""One client's training of one concept: BlockLoRA weights and trigger embeddings, jointly.

`ConceptTrainer` is plain PyTorch: it injects the slot's layers into a base, takes optimizer steps
on batches it is handed, checkpoints, and exports the artifact. `run_steps` is the one step loop:
`train_concept` runs it with a progress line and local checkpoints, the Ray Train workers in
`federation/train_func.py` run the very same loop with Ray's reporting as a callback.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save as safetensors_bytes

from blocklora.config import AdapterConfig, TrainConfig
from blocklora.files.atomic import atomic_write
from blocklora.files.checkpoint import load_optimizer_tensors, optimizer_tensors
from blocklora.method.artifact import ConceptArtifact, ConceptMeta, check_name
from blocklora.method.inject import eject, inject
from blocklora.method.tokens import (
    add_slot_tokens,
    token_ids,
    trigger_names,
    unwrap_token_embeddings,
    wrap_token_embeddings,
)
from blocklora.pipeline.base import Base
from blocklora.pipeline.conditioning import encode_prompts
from blocklora.pipeline.precision import MIXED, autocast, check_mixed
from blocklora.pipeline.prompts import class_picture_prompt
from blocklora.training.class_pictures import Say, class_image_sets, class_pool
from blocklora.training.data import load_concept_images
from blocklora.training.quiet import QuietBank, residuals_at

log = logging.getLogger(__name__)
StepCallback = Callable[["ConceptTrainer", float], None]  # called after every step with its loss


class ConceptTrainer:
    """Holds a base with one slot's BlockLoRA layers injected; `close()` gives the base back.

    With `train.mixed_precision` bf16/fp16 the base must already be in that half dtype (load it with
    `load_base(..., dtype=base_dtype(...))`); the trained tensors and AdamW's state are then float32,
    the forward runs under autocast and, for fp16, the loss is scaled (GradScaler)."""

    def __init__(self, base: Base, adapter: AdapterConfig, train: TrainConfig, slot: int,
                 name: str, class_word: str) -> None:
        self.name, self.class_word, self.slot = check_name(name), class_word, slot
        device = base.pipe.unet.device
        trained_dtype = _check_precision(base, train.mixed_precision)  # before anything changes the base
        self.base, self.adapter, self.train_cfg = base, adapter, train
        self.step_count = 0
        self.quiet: QuietBank | None = None  # the quiet penalty's activations, recorded on first use
        torch.manual_seed(train.seed)  # erasure masks use the global RNG
        self.gen = torch.Generator().manual_seed(train.seed)  # noise, timesteps, sampling, flips
        add_slot_tokens(base, adapter.num_slots, adapter.tokens_per_concept)
        self.triggers = trigger_names(slot, adapter.tokens_per_concept)
        self.layers = inject(base.pipe, adapter, slot, trained_dtype)
        self.tokens = wrap_token_embeddings(base, token_ids(base, slot, adapter.tokens_per_concept), class_word,
                                            rare_slot=slot if train.token_init == "rare" else None,
                                            dtype=trained_dtype)
        # fp16 gradients underflow without loss scaling; disabled (bf16, float32) it is a pass-through
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.mixed_precision == "fp16")
        self.noise_scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
        lora = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B) if p.requires_grad]
        groups = [{"params": lora, "lr": train.lr}]
        if train.token_lr > 0:
            groups.append({"params": [t.vectors for t in self.tokens.values()], "lr": train.token_lr})
        # fused: one kernel over all ~160 small tensors instead of a dozen ops each (49 -> 10 ms a step on
        # one loaded CPU thread: docs/results/main-job.md#time)
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=True)
        self.base.pipe.unet.train()
        for te in base.text_encoders.values():
            te.train()

    @property
    def trigger_text(self) -> str:
        return " ".join(self.triggers)

    def instance_prompt(self, caption: str | None) -> str:
        """A caption may say '{trigger}' where the concept goes; without one, the template is used."""
        if caption:
            return caption.replace("{trigger}", self.trigger_text)
        return self.train_cfg.prompt_template.format(trigger=self.trigger_text, class_word=self.class_word)

    def loss(self, images: torch.Tensor, prompts: list[str], gen: torch.Generator | None = None) -> torch.Tensor:
        """DreamBooth denoising loss for a batch of [-1, 1] images and their prompts; `gen` draws the
        latents, noise and timesteps (default: the training's own generator)."""
        pipe = self.base.pipe
        dev = pipe.unet.device
        gen = gen or self.gen
        with torch.no_grad():
            latents = pipe.vae.encode(images.to(dev, pipe.vae.dtype)).latent_dist.sample(gen)
            latents = latents * pipe.vae.config.scaling_factor
        if self.train_cfg.mixed_precision != "no":
            latents = latents.float()  # noise and target in float32; autocast casts what the UNet reads
        noise = torch.randn(latents.shape, generator=gen).to(dev, latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), generator=gen).to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        with autocast(self.train_cfg.mixed_precision, dev):
            cond, added = encode_prompts(self.base, prompts)
            pred = pipe.unet(noisy, t, cond, added_cond_kwargs=added).sample
        target = (self.noise_scheduler.get_velocity(latents, noise, t)
                  if self.noise_scheduler.config.prediction_type == "v_prediction" else noise)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def merge_scale(self) -> float:
        """1 on most steps; on `merge_scale_share` of them 1/n, n drawn from 2..K: the concept also learns
        to be drawn at the strength an Eq. 5 merge of n concepts leaves it (docs/results: identity)."""
        share = self.train_cfg.merge_scale_share
        if share <= 0 or torch.rand((), generator=self.gen) >= share:
            return 1.0
        return 1.0 / int(torch.randint(2, self.adapter.num_slots + 1, (), generator=self.gen))

    def step(self, images: torch.Tensor, captions: list[str | None],
             class_images: torch.Tensor | None = None) -> float:
        """One optimizer step; with `class_images`, adds the prior-preservation loss and/or the quiet
        penalty, as the config asks (the penalty's bank is recorded on first use: `next_step` records it
        from the whole pool first)."""
        cfg = self.train_cfg
        if cfg.flip:
            flip = torch.rand(images.shape[0], generator=self.gen) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        prompts = [self.instance_prompt(c) for c in captions]
        with residuals_at(self.layers, self.merge_scale()):
            per_sample = self.loss(images, prompts)
        loss = per_sample.mean()
        if class_images is not None:
            class_prompts = [class_picture_prompt(self.class_word)] * class_images.shape[0]
            if cfg.prior_preservation:
                loss = loss + cfg.prior_weight * self.loss(class_images, class_prompts).mean()
            if cfg.quiet_weight > 0:
                loss = loss + cfg.quiet_weight * self.quiet_bank(class_images).energy(self)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)  # unscales first; skips a step whose fp16 gradients overflowed
        self.scaler.update()
        self.step_count += 1
        return float(loss.detach())

    def quiet_bank(self, pictures: torch.Tensor, say: Say | None = None,
                   others: dict[str, torch.Tensor] | None = None) -> QuietBank:
        """The quiet penalty's bank, recorded on first use (blocklora/training/quiet.py) from `pictures` of the
        concept's class and the base's pictures of each of `quiet_classes`: `others` as `class_pool`
        fetched them, else read from the node's cache (or drawn here with the residuals off, as a resumed
        run's rows are trained) with the same seed, so a resumed run records the same bank.
        `say` hears what is drawn and how long the bank took: the wait a person would otherwise see as
        a silent first step."""
        if self.quiet is None:
            cfg, started = self.train_cfg, time.monotonic()
            words = cfg.quiet_others(self.class_word)
            if others is None:
                with residuals_at(self.layers, 0.0):
                    others = class_image_sets(self.base, words, cfg.num_class_images, cfg.seed, say=say)[0]
            groups = [(pictures, self.class_word), *((others[word], word) for word in words)]
            self.quiet = QuietBank.record(self, groups, cfg.seed)
            if say:
                say(f"quiet penalty's bank recorded over {len(groups)} classes in {time.monotonic() - started:.1f} s")
        return self.quiet

    def prepare(self, prior: torch.Tensor | None, say: Say | None = None,
                others: dict[str, torch.Tensor] | None = None) -> None:
        """Before the first step, what the first step would otherwise do unannounced: record the quiet
        penalty's bank (when the config has one) from `prior`, the concept's class pictures, and `others`
        (what `class_pool` returns)."""
        if prior is not None and self.train_cfg.quiet_weight > 0:
            self.quiet_bank(prior, say, others)

    def sample_batch(self, images: torch.Tensor, captions: list[str | None]) -> tuple[torch.Tensor, list[str | None]]:
        idx = torch.randint(0, images.shape[0], (self.train_cfg.batch_size,), generator=self.gen)
        return images[idx], [captions[i] for i in idx.tolist()]

    def next_step(self, images: torch.Tensor, captions: list[str | None], prior: torch.Tensor | None = None) -> float:
        """Draw a batch (and prior images, if any) from the concept's pool and take one step."""
        batch, caps = self.sample_batch(images, captions)
        cls = None
        self.prepare(prior)  # the bank is recorded from every class picture, not one batch of them
        if prior is not None:
            cls = prior[torch.randint(0, prior.shape[0], (self.train_cfg.batch_size,), generator=self.gen)]
        return self.step(batch, caps, cls)

    def artifact(self) -> ConceptArtifact:
        factors = {key: (layer.lora_A.detach().float().cpu().clone(), layer.lora_B.detach().float().cpu().clone())
                   for key, layer in self.layers.items()}
        embeds = {comp: tok.vectors.detach().float().cpu().clone() for comp, tok in self.tokens.items()}
        layout = {key: (layer.base.out_features, layer.base.in_features) for key, layer in self.layers.items()}
        meta = ConceptMeta(name=self.name, class_word=self.class_word, slot=self.slot, adapter=self.adapter,
                           base_fingerprint=self.base.fingerprint, layout=layout, triggers=tuple(self.triggers),
                           train_config={**json.loads(json.dumps(self.train_cfg.__dict__)),
                                         "steps_done": self.step_count})
        return ConceptArtifact.from_parts(meta, factors, embeds)

    # -- resumable checkpoints: safetensors for tensors, JSON for the rest (local files, no pickle)
    def save_checkpoint(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        tensors |= {f"opt.{k}": v for k, v in optimizer_tensors(self.opt).items()}
        tensors["rng.gen"] = self.gen.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        atomic_write(folder / "checkpoint.safetensors", safetensors_bytes(tensors))
        atomic_write(folder / "checkpoint.json", json.dumps({"step": self.step_count, "name": self.name,
                                                             "slot": self.slot,
                                                             "scaler": self.scaler.state_dict()}).encode())
        return folder

    def load_checkpoint(self, folder: str | Path) -> bool:
        """Resume if `folder` holds a checkpoint of this concept; returns whether it did."""
        folder = Path(folder)
        if not (folder / "checkpoint.json").exists():
            return False
        info = json.loads((folder / "checkpoint.json").read_text())
        if info["name"] != self.name or info["slot"] != self.slot:
            raise ValueError(f"checkpoint in {folder} belongs to {info['name']!r} slot {info['slot']}, "
                             f"not {self.name!r} slot {self.slot}")
        tensors = load_file(str(folder / "checkpoint.safetensors"))
        params = [p for g in self.opt.param_groups for p in g["params"]]
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"])
        load_optimizer_tensors(self.opt, {k[len("opt."):]: v for k, v in tensors.items() if k.startswith("opt.")})
        self.gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step_count = info["step"]
        if info.get("scaler"):  # fp16's loss scale and its growth count; {} when no scaler runs
            self.scaler.load_state_dict(info["scaler"])
        return True

    def close(self) -> None:
        """Remove the injected layers and token wrappers: the base is as it was loaded."""
        eject(self.base.pipe)
        unwrap_token_embeddings(self.base)
        self.base.pipe.unet.eval()
        for te in self.base.text_encoders.values():
            te.eval()


def _check_precision(base: Base, mixed_precision: str) -> torch.dtype | None:
    """The dtype of the trained parameters: float32 under mixed precision, else None (the base's).
    Refuses a base that is not in the mixed-precision half dtype, or a device that cannot run it."""
    half = MIXED[mixed_precision]
    if half is None:
        return None
    check_mixed(mixed_precision, base.pipe.unet.device)
    if base.pipe.unet.dtype != half:
        raise ValueError(f"mixed_precision={mixed_precision!r} trains on a {half} base, but this base is "
                         f"{base.pipe.unet.dtype}; load it with load_base(..., dtype=base_dtype({mixed_precision!r}))")
    return torch.float32


def checkpoint_due(trainer: ConceptTrainer) -> bool:
    """At the configured interval, and after the last step (so a finished run resumes as finished)."""
    step, cfg = trainer.step_count, trainer.train_cfg
    return step == cfg.steps or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)


def run_steps(trainer: ConceptTrainer, images: torch.Tensor, captions: list[str | None],
              prior: torch.Tensor | None, callbacks: Sequence[StepCallback]) -> None:
    """The step loop: from wherever the trainer is (0, or a resumed step) to the configured count.
    Everything around a step (progress, reporting, checkpoints) is a callback, so the plain and the
    Ray Train paths cannot drift apart."""
    while trainer.step_count < trainer.train_cfg.steps:
        loss = trainer.next_step(images, captions, prior)
        for callback in callbacks:
            callback(trainer, loss)


class Progress:
    """A step callback a person can follow: `[name] step k/N  loss …  … steps/s  ETA …` at the first
    step, then at most every `interval_s`, and at the last; plain lines, so they read the same in a
    terminal, in `ray job logs` and in a file. It also keeps the steady-state step rate (timed from
    the end of the first step, which carries one-off warm-up), which benchmarks compare. `report`,
    if given, gets (step, total, ETA in seconds or None) whenever a line is due: as rarely as the
    lines, so a report that costs a fraction of a millisecond never slows training measurably."""

    def __init__(self, name: str, total: int, interval_s: float = 5.0,
                 out: Callable[[str], None] | None = print,
                 report: Callable[[int, int, float | None], None] | None = None) -> None:
        self.name, self.total, self.interval_s, self.out, self.report = name, total, interval_s, out, report
        self.first: tuple[int, float] | None = None  # (step, time) at the end of the first step seen
        self.last: tuple[int, float] | None = None
        self.shown_at = 0.0
        self.losses: list[float] = []  # since the last line: its loss is their mean, less noisy than one step's

    def __call__(self, trainer: ConceptTrainer, loss: float) -> None:
        now, step = time.monotonic(), trainer.step_count
        self.losses.append(loss)
        self.last = (step, now)
        if self.first is None:
            self.first = self.last
        elif step < self.total and now - self.shown_at < self.interval_s:
            return
        self.shown_at = now
        rate = self.steady_rate()
        eta = (self.total - step) / rate if rate else None
        if self.out is not None:
            speed = f"{rate:.2f} steps/s  ETA {eta:.0f} s" if rate else "first step"
            self.out(f"[{self.name}] step {step}/{self.total}  loss {sum(self.losses) / len(self.losses):.4f}  {speed}")
        if self.report is not None:
            self.report(step, self.total, eta)
        self.losses.clear()

    def say(self, text: str) -> None:
        """A line about what the run does between steps (drawing class pictures), in the steps' form."""
        if self.out is not None:
            self.out(f"[{self.name}] {text}")

    def steady_rate(self) -> float | None:
        """Steps per second after the first step (None until there are two steps)."""
        if self.first is None or self.last is None or self.last[0] == self.first[0]:
            return None
        return (self.last[0] - self.first[0]) / (self.last[1] - self.first[1])

    def summary(self) -> str:
        """The closing line: the steady rate, and the torch threads it was measured with."""
        rate = self.steady_rate()
        return f"[{self.name}] trained to step {self.total}: " + (
            f"{rate:.3f} steps/s steady (after the first step)" if rate else "no steady rate (fewer than 2 steps)") + (
            f", {torch.get_num_threads()} torch thread(s)")


def train_concept(base: Base, images_dir: str | Path, name: str, class_word: str, slot: int,
                  adapter: AdapterConfig = AdapterConfig(), train: TrainConfig = TrainConfig(),
                  checkpoint_dir: str | Path | None = None, progress: bool = True) -> ConceptArtifact:
    """Folder of images + class word in, artifact out; resumes from `checkpoint_dir` if present."""
    images, captions = load_concept_images(images_dir, train.resolution)
    shown = Progress(name, train.steps, out=print if progress else None)
    prior, others = class_pool(base, train, class_word, shown.say)
    trainer = ConceptTrainer(base, adapter, train, slot, name, class_word)
    try:
        if checkpoint_dir and trainer.load_checkpoint(checkpoint_dir):
            log.info("resumed %s from step %d", name, trainer.step_count)
        trainer.prepare(prior, shown.say, others)
        callbacks: list[StepCallback] = [shown]
        if checkpoint_dir:
            callbacks.append(lambda t, loss: checkpoint_due(t) and t.save_checkpoint(checkpoint_dir))
        run_steps(trainer, images, captions, prior, callbacks)
        if progress:
            print(shown.summary())
        return trainer.artifact()
    finally:
        trainer.close()
