"""Export concepts to the standard LoRA format that diffusers' `load_lora_weights` reads.

A set S of concepts becomes one rank-(Σ r_i) LoRA per layer: A = [A_1; …; A_N] stacked, and B with
column block i holding α_i (M_i ⊙ B_i), so B A = Σ α_i dW_i exactly. `MergedFactors` holds such a
set as its factors; the coordinator keeps the federation's live set in one and serves it as this file.
Trigger embeddings go to a separate textual-inversion file per concept (diffusers' `load_textual_inversion`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from blocklora.method.artifact import ConceptArtifact
from blocklora.method.partition import block_delta


class MergedFactors:
    """Σ α_i dW_i over a set of concepts, held as what it is made of: per target, each concept's
    A (r, n) and the owned rows of its B (|R|, r). Block-sparse by construction, exact (no product
    is formed until a reader asks), and already in LoRA form, so the standard file is a stacking.

    Kept in `dtype` (the base's), which costs nothing when the artifacts are already in it: the
    factors are then the artifact's own tensors, not copies.
    """

    def __init__(self, layout: Mapping[str, tuple[int, int]], dtype: torch.dtype = torch.float32) -> None:
        self.layout, self.dtype = dict(layout), dtype
        self._parts: dict[str, dict[str, tuple[slice, torch.Tensor, torch.Tensor]]] = {}  # name -> key -> (R, A, B_R)

    @property
    def names(self) -> list[str]:
        return list(self._parts)

    def add(self, art: ConceptArtifact) -> None:
        if art.meta.layout != self.layout:
            raise ValueError(f"{art.name!r} was trained for other layers or shapes than this set")
        self._parts[art.name] = {key: (art.rows(key), *(t.to(self.dtype) for t in art.factors(key)))
                                 for key in self.layout}

    def remove(self, name: str) -> None:
        del self._parts[name]

    def _scaled(self, key: str,
                scales: Mapping[str, float] | None) -> list[tuple[slice, torch.Tensor, torch.Tensor, float]]:
        return [(*parts[key], 1.0 if scales is None else scales[name]) for name, parts in self._parts.items()]

    def dense(self, scales: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Target key -> Σ α_i dW_i as an m x n matrix (α = 1 unless `scales` names it), formed now."""
        out = {}
        for key, (m, n) in self.layout.items():
            dw = torch.zeros(m, n, dtype=self.dtype)
            for rows, a, b_rows, s in self._scaled(key, scales):
                dw[rows] += s * block_delta(b_rows, a)  # (|R|, n)
            out[key] = dw
        return out

    def lora_state_dict(self, scales: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
        """peft-format keys ("unet.….to_q.lora_A.weight") of one rank-Σr LoRA whose B A = Σ α_i dW_i."""
        if not self._parts:
            raise ValueError("nothing to export: no concepts given")
        out: dict[str, torch.Tensor] = {}
        for key, (m, _n) in self.layout.items():
            parts = self._scaled(key, scales)
            a_stack = torch.cat([a for _, a, _, _ in parts])  # (Σr, n)
            b_full = torch.zeros(m, a_stack.shape[0], dtype=self.dtype)  # (m, Σr)
            col = 0
            for rows, a, b_rows, s in parts:
                b_full[rows, col:col + a.shape[0]] = s * b_rows
                col += a.shape[0]
            out[f"{key}.lora_A.weight"] = a_stack.contiguous()
            out[f"{key}.lora_B.weight"] = b_full
        return out


def to_lora_state_dict(arts: list[ConceptArtifact], scales: list[float] | None = None) -> dict[str, torch.Tensor]:
    """peft-format keys ("unet.….to_q.lora_A.weight") for the merged set `arts`."""
    if not arts:
        raise ValueError("nothing to export: no concepts given")
    for a in arts[1:]:
        if a.meta.layout != arts[0].meta.layout or a.meta.base_fingerprint != arts[0].meta.base_fingerprint:
            raise ValueError(f"{a.name!r} was trained for another base or layer set than {arts[0].name!r}")
    merged = MergedFactors(arts[0].meta.layout)
    for a in arts:
        merged.add(a)
    return merged.lora_state_dict(dict(zip((a.name for a in arts), scales or [1.0] * len(arts))))


def export_lora(arts: list[ConceptArtifact], out_dir: str | Path, scales: list[float] | None = None) -> dict[str, Path]:
    """Write `pytorch_lora_weights.safetensors` plus one `<name>.textual_inversion.safetensors` per
    concept (per text encoder) into `out_dir`; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"lora": out_dir / "pytorch_lora_weights.safetensors"}
    save_file(to_lora_state_dict(arts, scales), str(paths["lora"]))
    for a in arts:
        for comp, vec in a.token_embeds().items():
            p = out_dir / f"{a.name}.{comp}.textual_inversion.safetensors"
            save_file({"emb_params": vec.float().contiguous()}, str(p))
            paths[f"{a.name}.{comp}"] = p
    return paths
