"""The quiet penalty's activation bank: what each injected layer reads while the base denoises its own
class-prompt pictures, recorded once, so the penalty costs small matmuls per step instead of a UNet pass.

Why a bank and not a fresh pass each step: the penalty asks a concept's rows to stay quiet on pictures
without the concept (what the other concepts' prompts are, once merged). A fresh no-grad denoising pass
per step costs a UNet pass more per training step (the residual recomputed per layer on top); recorded
once from the base itself (every residual off), the same inputs cost a few small matmuls a step. The
base's activations are also what the penalty is about: when the rows do stay quiet on those pictures,
the adapted model reads nearly what the base reads there.

Which pictures: the concept's own class, and the other classes of `TrainConfig.quiet_classes`. In a
merge the other concepts are mostly other classes asked for with other words; rows asked to stay
quiet on those too hold a large merged set better, and lose nothing alone (docs/results: the quiet
penalty over other classes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from blocklora.method.layer import BlockLoRALinear
from blocklora.pipeline.prompts import class_picture_prompt


class Denoising(Protocol):
    """What the bank needs of a trainer (`blocklora.training.trainer.ConceptTrainer` is one): its injected
    layers and its denoising loss. A protocol, so that the trainer imports this module and not the reverse."""

    layers: dict[str, BlockLoRALinear]

    def loss(self, images: torch.Tensor, prompts: list[str], gen: torch.Generator | None = None) -> torch.Tensor: ...


@contextmanager
def residuals_at(layers: dict[str, BlockLoRALinear], scale: float) -> Iterator[None]:
    """Every layer's residual at `scale` for the block, then back: 0 is the base alone whatever the
    rows hold (a resumed run's are trained); 1/n is the strength an Eq. 5 merge of n gives it."""
    scales = {key: layer.scale for key, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.scale = scale
        yield
    finally:
        for key, layer in layers.items():
            layer.scale = scales[key]


@dataclass(frozen=True)
class QuietBank:
    """Per injected layer: sampled input rows x (rows, n) and mean ||W0 x||² over the layer's owned rows."""

    inputs: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]

    @classmethod
    def record(cls, trainer: Denoising, groups: Sequence[tuple[torch.Tensor, str]], seed: int, draws: int = 4,
               rows: int = 512) -> QuietBank:
        """For each (pictures, class word) group (the base's pictures of `class_picture_prompt(word)`),
        denoise the pictures `draws` times at random noise and timesteps with every residual off, keeping
        `rows` random token rows of each layer's input per group. Its own generator: a resumed run
        records the very same bank, whatever step it resumes at."""
        gen = torch.Generator().manual_seed(seed)
        seen: dict[str, list[torch.Tensor]] = {}
        current: dict[str, list[torch.Tensor]] = {}

        def keep(key: str):
            def hook(layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                current[key].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))
            return hook

        hooks = [layer.register_forward_hook(keep(key)) for key, layer in trainer.layers.items()]
        try:
            with residuals_at(trainer.layers, 0.0), torch.no_grad():
                for images, word in groups:
                    current.update({key: [] for key in trainer.layers})
                    for _ in range(draws):
                        trainer.loss(images, [class_picture_prompt(word)] * images.shape[0], gen)
                    for key, xs in current.items():
                        x = torch.cat(xs)
                        pick = torch.randperm(x.shape[0], generator=gen)[:rows].to(x.device)
                        seen.setdefault(key, []).append(x[pick])
        finally:
            for h in hooks:
                h.remove()
        inputs, reference = {}, {}
        for key, layer in trainer.layers.items():
            x = torch.cat(seen[key])
            w, b = layer.base.weight[layer.rows], layer.base.bias
            with torch.no_grad():
                ref = F.linear(x, w, None if b is None else b[layer.rows]).float().pow(2).mean()
            inputs[key], reference[key] = x, ref.clamp_min(1e-12)
        return cls(inputs, reference)

    def energy(self, trainer: Denoising) -> torch.Tensor:
        """Mean over layers of ||(M ⊙ B) A x||² / ||W0 x||² on the owned rows, differentiable in A and B."""
        terms = []
        for key, layer in trainer.layers.items():
            res = (self.inputs[key].to(layer.lora_A.dtype) @ layer.lora_A.T) @ layer.lora_B.T
            terms.append(res.float().pow(2).mean() / self.reference[key])
        return torch.stack(terms).mean()
