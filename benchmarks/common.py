"""What every benchmark shares: the run record, JSON/CSV/PNG output, an SD1.5-shaped base with
random weights, random concepts, and memory accounting that sees torch's allocations.

Benchmarks are scripts (`python -m benchmarks.<name>`), not tests: they print ONE JSON object as
their last stdout line so a caller (CI, a test, a notebook) can parse the result without scraping.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from benchmarks import synthetic
from blocklora.config import AdapterConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.slots import SlotSpace
from blocklora.pipeline.base import Base, tiny_pipeline
from blocklora.pipeline.precision import DTYPES  # --dtype names, as the CLI and the serve app take them
from blocklora.pipeline.tokenizer import VOCAB_SIZE

RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, the same two flags on every benchmark."""
    p.add_argument("--device", default="cpu", help="torch device the models run on: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="dtype of the frozen base weights (and of the activations that flow through them)")


def environment(device: torch.device | str, dtype: torch.dtype) -> dict:
    """Where and how a number was measured; timings mean nothing without it."""
    import diffusers
    import peft
    device = torch.device(device)
    return {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "load_avg_1min": os.getloadavg()[0],  # the machine is shared: a high load explains noise
    }


def emit(result: dict) -> None:
    """The last stdout line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True, default=float), flush=True)


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows of equal keys as a CSV table (columns in first-row order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def line_plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
              title: str, logy: bool = False) -> Path:
    """One PNG with a line per series; matplotlib's Agg backend, so no display is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def sd15_unet() -> UNet2DConditionModel:
    """Stable Diffusion 1.5's UNet architecture (860M parameters), random weights: its linear
    layers have the real shapes, which is all that merge and step costs depend on."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def sd15_base(seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Base:
    """The SD1.5 UNet behind the tiny VAE and a one-layer, 768-wide CLIP text encoder.

    The fingerprint is a label rather than a hash of 3.4 GB of random weights: these bases are
    rebuilt per run and never meet a concept trained elsewhere.
    """
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=768, num_attention_heads=12,
        num_hidden_layers=1, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=768,
    ))
    parts = {**tiny_pipeline().components, "unet": sd15_unet(), "text_encoder": text_encoder}
    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.to(device, dtype)
    return Base(pipe=pipe, fingerprint=f"sd15-shaped-random-seed{seed}", spec="sd15-random")


def random_artifact(base: Base, adapter: AdapterConfig, layout: dict[str, tuple[int, int]],
                    slot: int, seed: int) -> ConceptArtifact:
    """A concept with non-zero random A, B and trigger embeddings, built without training: merge
    costs do not depend on what the numbers are, only on their shapes."""
    return synthetic.random_artifact(f"concept{slot}", slot, adapter, base.fingerprint, layout,
                                     SlotSpace.of(base, adapter).hidden, seed=seed, b_scale=1e-2)


def rss() -> int:
    return psutil.Process().memory_info().rss


@contextmanager
def peak_rss() -> Iterator[dict]:
    """Sample this process's RSS every millisecond; yields a dict whose "extra" is set on exit to
    the peak minus the RSS at entry. A coarse, allocator-dependent number, reported beside torch's
    exact accounting, never instead of it."""
    box = {"extra": 0}
    start, stop = rss(), threading.Event()
    peak = [start]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        box["extra"] = max(peak[0], rss()) - start


def saved_activation_bytes(fn: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs, each storage counted once
    and the storages of `exclude` (the model's own weights) left out: the activation memory a
    training step adds on top of the model."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the queued GPU work: CUDA calls return before their kernels finish, so a clock
    read without this measures the launch, not the work. A no-op on the CPU."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Wall seconds of one call, the device's queued work included (the one clock of benchmarks/)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0
