"""The peers, behind the same interface: plain LoRA (averaged or summed), DB-LoRA, Orthogonal
Adaptation, TIES merging, Mix-of-Show's gradient fusion, and BlockLoRA's own ablations. Each is an adapter
shape for training plus a merge rule that turns a set of artifacts into one residual per target
layer."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch

from blocklora.config import AdapterConfig, TrainConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.inject import find_targets
from blocklora.method.slots import PipelineSlots
from blocklora.pipeline.base import Base
from blocklora.pipeline.conditioning import encode_prompts


@dataclass(frozen=True)
class Method:
    """How concepts are trained (adapter and training overrides) and how a set of them is merged."""

    name: str
    adapter: dict  # overrides applied to the federation's AdapterConfig
    merge: str  # "sum" (α = 1), "mean" (α = 1/N), "ties" or "fusion" (needs input_grams)
    train: dict = dataclasses.field(default_factory=dict)  # overrides applied to the study's TrainConfig

    def adapter_config(self, base_cfg: AdapterConfig) -> AdapterConfig:
        return dataclasses.replace(base_cfg, **self.adapter)

    def train_config(self, base_cfg: TrainConfig) -> TrainConfig:
        return dataclasses.replace(base_cfg, **self.train)


PLAIN = {"blockwise": False, "erasure": 0.0}  # a plain LoRA: B owns every row, no erasure
# The paper's peers. Every method that learns a trigger embedding (ours, ED-LoRA for Mix-of-Show,
# TIES, Orthogonal Adaptation) uses the study's lr and token_lr; DB-LoRA keeps a fixed rare token.
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("blocklora", {}, "sum"),  # α = 1: what LiveMerge does by default
    Method("blocklora-mean", {}, "mean"),  # α = 1/N: the paper's Eq. 5
    Method("blocklora-no-erasure", {"erasure": 0.0}, "sum"),
    Method("blocklora-no-blocks", {"blockwise": False}, "sum"),
    Method("lora-mean", PLAIN, "mean"),  # Mix-of-Show's weighted averaging of ED-LoRAs
    Method("lora-sum", PLAIN, "sum"),
    Method("db-lora", PLAIN, "mean", {"token_lr": 0.0, "token_init": "rare"}),  # DreamBooth-LoRA averaged
    Method("orthogonal", {**PLAIN, "freeze_a": "orthogonal"}, "sum"),
    Method("ties", PLAIN, "ties"),
    Method("mix-of-show", PLAIN, "fusion"),  # Mix-of-Show's gradient fusion of ED-LoRAs
]}


def ties(deltas: list[torch.Tensor], density: float = 0.2, lam: float = 1.0) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each update to its top-`density` magnitudes, elect
    a sign per entry by total mass, average only the entries that agree with it."""
    stacked = torch.stack([d.float() for d in deltas])  # (N, m, n)
    flat = stacked.reshape(len(deltas), -1)
    k = max(1, int(density * flat.shape[1]))
    thresh = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return (lam * merged).reshape(stacked.shape[1:])


def gradient_fusion(deltas: list[torch.Tensor], grams: list[torch.Tensor], ridge: float = 1e-4) -> torch.Tensor:
    """Mix-of-Show's gradient fusion (Gu et al. 2023) for one layer, solved exactly.

    The fused dW minimises sum_i ||(W0 + dW_i) X_i - (W0 + dW) X_i||^2: every concept keeps its
    layer outputs on its own inputs X_i as far as the others allow. Mix-of-Show descends that
    objective with gradient steps; its optimum is dW = (sum_i dW_i C_i)(sum_i C_i + eps I)^-1 with
    C_i = X_i^T X_i, so we solve for it directly (`ridge` scales eps to the mean input energy).
    """
    total = sum(g.double() for g in grams)
    total = total + ridge * total.diagonal().mean().clamp_min(1e-12) * torch.eye(total.shape[0], dtype=total.dtype)
    rhs = sum(d.double() @ g.double() for d, g in zip(deltas, grams))  # (m, n)
    return torch.linalg.solve(total, rhs.T).T.float()  # total is symmetric: X total = rhs <=> total X^T = rhs^T


@torch.no_grad()
def input_grams(base: Base, adapter: AdapterConfig, art: ConceptArtifact, latents: torch.Tensor,
                t: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """C_i = X_i^T X_i of every target layer's inputs while `art` alone denoises `latents` at
    timesteps `t` under `prompts`: the per-concept statistics gradient fusion needs."""
    targets = find_targets(base.pipe, adapter)
    grams: dict[str, torch.Tensor] = {}

    def record(key: str, _mod: torch.nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        grams[key] = grams.get(key, 0) + x.T @ x

    hooks = [lin.register_forward_hook(partial(record, k)) for k, lin in targets.items() if k in art.meta.layout]
    try:
        with residual_applied(base, adapter, {k: art.delta(k) for k in art.meta.layout}, [art]):
            cond, added = encode_prompts(base, prompts)
            base.pipe.unet(latents, t, cond, added_cond_kwargs=added)
    finally:
        for h in hooks:
            h.remove()
    return grams


def merge_deltas(arts: list[ConceptArtifact], rule: str, scales: list[float] | None = None,
                 grams: list[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """One dense residual per target key for the set `arts` under `rule`; "fusion" needs each
    concept's `input_grams`, in the order of `arts`."""
    if not arts:
        return {}
    if rule == "ties":
        return {k: ties([a.delta(k) for a in arts]) for k in arts[0].meta.layout}
    if rule == "fusion":
        if grams is None or len(grams) != len(arts):
            raise ValueError("the 'fusion' rule needs one input_grams(...) per concept, in the order of the concepts")
        return {k: gradient_fusion([a.delta(k) for a in arts], [g[k] for g in grams]) for k in arts[0].meta.layout}
    if rule not in ("sum", "mean"):
        raise ValueError(f"unknown merge rule {rule!r}; use 'sum', 'mean', 'ties' or 'fusion'")
    if scales is None:
        scales = [1.0 / len(arts) if rule == "mean" else 1.0] * len(arts)
    return {k: sum(s * a.delta(k).float() for a, s in zip(arts, scales)) for k in arts[0].meta.layout}


@contextmanager
def residual_applied(base: Base, adapter: AdapterConfig, residual: dict[str, torch.Tensor],
                     arts: list[ConceptArtifact]) -> Iterator[None]:
    """W = W0 + residual on every target, every concept's trigger embeddings written, for the
    duration of the block; W0 and the embedding rows are restored exactly afterwards."""
    slots = PipelineSlots(base, adapter)
    targets = slots.targets
    saved = {k: lin.weight.detach().clone() for k, lin in targets.items() if k in residual}
    saved_triggers: list[tuple[ConceptArtifact, dict[str, torch.Tensor]]] = []
    try:
        with torch.no_grad():
            for k, dw in residual.items():
                targets[k].weight += dw.to(targets[k].weight.device, targets[k].weight.dtype)
            for a in arts:
                saved_triggers.append((a, slots.write_triggers(a)))
        yield
    finally:
        with torch.no_grad():
            for k, w in saved.items():
                targets[k].weight.copy_(w)
            for a, rows in reversed(saved_triggers):  # reversed: two concepts of one slot unwind in order
                slots.restore_triggers(a, rows)
