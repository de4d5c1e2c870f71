"""The per-worker Ray Train function: plain PyTorch running `blocklora.training.trainer.run_steps`.

The Ray lines are marked `# Ray`. Data parallel without DDP wrapping: ConceptTrainer calls the
UNet itself, so instead of `prepare_model` every worker all-reduces the trainable gradients
(LoRA A, owned B rows, trigger vectors) in a fixed order just before the optimizer step. All
workers start from rank 0's parameters and draw different batches and noise, so with N workers
one step sees N x batch_size images. Rank 0 alone writes checkpoints and prints progress; every
worker reports, every `report_every` steps and with each checkpoint: a report is a collective across
the workers (a round trip to the Train controller), far too slow to make on every toy-base step.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray.train  # Ray
import ray.train.torch  # Ray
import torch
import torch.distributed as dist
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from blocklora.config import AdapterConfig, TrainConfig, from_dict
from blocklora.pipeline.base import load_base
from blocklora.pipeline.precision import base_dtype
from blocklora.training.class_pictures import class_pool
from blocklora.training.trainer import ConceptTrainer, Progress, checkpoint_due, run_steps
from federation.coordinator import get as coordinator_named
from federation.protocol import ARTIFACT_FILE


def shard_tensors(shard) -> tuple[torch.Tensor, list[str | None]]:
    """All of a (small) concept dataset as (N, 3, res, res) images and captions."""
    rows = list(shard.iter_rows())
    if not rows:
        raise ValueError("the training dataset reached this worker empty; check the images folder")
    images = torch.from_numpy(np.stack([r["image"] for r in rows]))
    return images, [r["caption"] or None for r in rows]


def _all_reduce_grads(opt: torch.optim.Optimizer, world: int) -> None:
    """Average every trainable gradient over the workers (same order on every rank)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def _sync_workers(trainer: ConceptTrainer, rank: int, world: int) -> None:
    """Same starting parameters everywhere, gradient averaging, and a different random stream
    per rank (rank 0 keeps the trainer's own, so one worker reproduces train_concept)."""
    for group in trainer.opt.param_groups:
        for p in group["params"]:
            dist.broadcast(p.data, src=0)
    trainer.opt.register_step_pre_hook(lambda opt, args, kwargs: _all_reduce_grads(opt, world))
    if rank > 0:
        seed = trainer.train_cfg.seed + 100_003 * rank + trainer.step_count
        trainer.gen.manual_seed(seed)
        torch.manual_seed(seed)  # erasure masks


class RayReport:
    """The step callback of the Ray Train path: metrics every `report_every` steps, a checkpoint
    when one is due (written by rank 0), and the final artifact inside the last checkpoint. Every
    rank reports at the same steps (the decision is by step, never by time: a report is collective).
    `marks` (wall-clock times of this worker's phases) ride along with the last report, and the time
    spent reporting and checkpointing is added up, so the client job can say where its time went."""

    def __init__(self, rank: int, marks: dict[str, float]) -> None:
        self.rank, self.marks = rank, marks
        self.spent = {"s_report": 0.0, "s_checkpoint": 0.0}
        self.losses: list[float] = []

    def __call__(self, trainer: ConceptTrainer, loss: float) -> None:
        step, cfg = trainer.step_count, trainer.train_cfg
        self.losses.append(loss)
        checkpoint, last = checkpoint_due(trainer), step == cfg.steps
        if not (checkpoint or step % cfg.report_every == 0):
            return
        t0 = time.time()
        metrics: dict[str, Any] = {"loss": sum(self.losses) / len(self.losses), "step": step}
        self.losses.clear()
        if last:
            metrics |= self.marks | self.spent
        if self.rank == 0 and checkpoint:
            with tempfile.TemporaryDirectory() as folder:
                trainer.save_checkpoint(folder)
                if last:
                    (Path(folder) / ARTIFACT_FILE).write_bytes(trainer.artifact().to_bytes())
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))  # Ray
            self.spent["s_checkpoint"] += time.time() - t0
        else:
            ray.train.report(metrics)  # Ray
            self.spent["s_report"] += time.time() - t0


def progress_reporter(config: dict[str, Any]) -> Callable[[int, int, float | None], None] | None:
    """Rank 0's step reports to the coordinator (None: the job asked for none). Fire-and-forget: the
    call is queued and never awaited, so a slow or restarting coordinator never holds a step up."""
    target = config["progress"]
    if target is None:
        return None
    coordinator = coordinator_named(target["coordinator"], target["namespace"])  # Ray
    return lambda step, steps, eta: coordinator.progress.remote(  # Ray: the reply is never fetched
        config["name"], target["reservation_id"], step, steps, eta)


def train_func(config: dict[str, Any]) -> None:
    """config: base_spec, base_fingerprint, adapter (dict), train (dict), slot, name, class_word,
    ray_log_level (Ray Train's own INFO lines, e.g. one per report, only when the user asked),
    progress (where rank 0 sends its step reports, or None)."""
    marks = {"t_worker_start": time.time()}
    for name in ("", "ray.train"):  # Ray: Train logs through both (one INFO line per report, at the root)
        logging.getLogger(name).setLevel(config["ray_log_level"])
    if config["ray_log_level"] != "INFO":  # nor the libraries' loading bars
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    adapter = from_dict(AdapterConfig, config["adapter"])
    train = from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()  # Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()  # Ray
    if world > 1 and train.mixed_precision == "fp16":
        raise ValueError("mixed_precision='fp16' trains on one worker only: each worker's GradScaler would skip "
                         "overflowing steps on its own and the workers' collectives would part; use bf16")
    base = load_base(config["base_spec"], device=ray.train.torch.get_device(),  # Ray: this worker's device
                     dtype=base_dtype(train.mixed_precision))
    if base.fingerprint != config["base_fingerprint"]:
        raise RuntimeError(f"base {config['base_spec']!r} loads as {base.fingerprint[:12]}… on this worker, but "
                           f"the federation's is {config['base_fingerprint'][:12]}…; use the same base files")
    marks["t_base_loaded"] = time.time()
    images, captions = shard_tensors(ray.train.get_dataset_shard("train"))  # Ray
    marks["t_shard_read"] = time.time()
    shown = Progress(config["name"], train.steps, out=print if rank == 0 else None,
                     report=progress_reporter(config) if rank == 0 else None)
    prior, others = class_pool(base, train, config["class_word"], shown.say)
    trainer = ConceptTrainer(base, adapter, train, config["slot"], config["name"], config["class_word"])
    checkpoint = ray.train.get_checkpoint()  # Ray: set when this run is a retry or a resumed run
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.load_checkpoint(folder)
    if world > 1:
        _sync_workers(trainer, rank, world)
    trainer.prepare(prior, shown.say, others)
    marks["t_loop_start"] = time.time()

    def stamp(trainer: ConceptTrainer, loss: float) -> None:
        """Wall-clock ends of the first and the latest step, for the job's phase profile."""
        marks.setdefault("t_first_step", time.time())
        marks["t_last_step"] = time.time()

    try:
        run_steps(trainer, images, captions, prior, [stamp, shown, RayReport(rank, marks)])
        if rank == 0:
            print(shown.summary(), flush=True)
    finally:
        trainer.close()
