"""The quiet penalty's activation bank: what each injected layer reads while the base denoises its own
class-prompt pictures, recorded once, so the penalty costs small matmuls per step instead of a UNet pass.

Why a bank and not a fresh pass each step: the penalty asks a concept's rows to stay quiet on pictures
without the concept (what the other concepts' prompts are, once merged). A fresh no-grad denoising pass
per step cost 68% more per training step on the toy base (the residual recomputed per layer on top);
recorded once from the base itself (every residual off), the same inputs cost a few milliseconds a
step. The base's activations are also what the penalty is about: when the rows do stay quiet on those
pictures, the adapted model reads nearly what the base reads there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from blocklora.prompts import class_picture_prompt

if TYPE_CHECKING:
    from blocklora.trainer import ConceptTrainer


@dataclass(frozen=True)
class QuietBank:
    """Per injected layer: sampled input rows x (rows, n) and mean ||W0 x||² over the layer's owned rows."""

    inputs: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]

    @classmethod
    def record(cls, trainer: ConceptTrainer, images: torch.Tensor, seed: int, draws: int = 4,
               rows: int = 512) -> QuietBank:
        """Denoise `images` (the base's class-prompt pictures) `draws` times at random noise and timesteps
        with every residual off, keeping `rows` random token rows of each layer's input. Its own
        generator: a resumed run records the very same bank, whatever step it resumes at."""
        gen = torch.Generator().manual_seed(seed)
        prompts = [class_picture_prompt(trainer.class_word)] * images.shape[0]
        seen: dict[str, list[torch.Tensor]] = {key: [] for key in trainer.layers}

        def keep(key: str):
            def hook(layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                seen[key].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))
            return hook

        scales = {key: layer.scale for key, layer in trainer.layers.items()}
        hooks = [layer.register_forward_hook(keep(key)) for key, layer in trainer.layers.items()]
        try:
            for layer in trainer.layers.values():
                layer.scale = 0.0  # the base's own activations: no residual anywhere
            with torch.no_grad():
                for _ in range(draws):
                    trainer.loss(images, prompts, gen)
        finally:
            for h in hooks:
                h.remove()
            for key, layer in trainer.layers.items():
                layer.scale = scales[key]
        inputs, reference = {}, {}
        for key, layer in trainer.layers.items():
            x = torch.cat(seen[key])
            x = x[torch.randperm(x.shape[0], generator=gen)[:rows].to(x.device)]
            w, b = layer.base.weight[layer.rows], layer.base.bias
            with torch.no_grad():
                ref = F.linear(x, w, None if b is None else b[layer.rows]).float().pow(2).mean()
            inputs[key], reference[key] = x, ref.clamp_min(1e-12)
        return cls(inputs, reference)

    def energy(self, trainer: ConceptTrainer) -> torch.Tensor:
        """Mean over layers of ||(M ⊙ B) A x||² / ||W0 x||² on the owned rows, differentiable in A and B."""
        terms = []
        for key, layer in trainer.layers.items():
            res = (self.inputs[key].to(layer.lora_A.dtype) @ layer.lora_A.T) @ layer.lora_B.T
            terms.append(res.float().pow(2).mean() / self.reference[key])
        return torch.stack(terms).mean()
