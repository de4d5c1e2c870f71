"""Export concepts to the standard LoRA format that diffusers' `load_lora_weights` reads.

A set S of concepts becomes one rank-(Σ r_i) LoRA per layer: A = [A_1; …; A_N] stacked, and B with
column block i holding α_i (M_i ⊙ B_i), so B A = Σ α_i dW_i exactly. Trigger embeddings go to a
separate textual-inversion file per concept (diffusers' `load_textual_inversion`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from blocklora.artifact import ConceptArtifact


def to_lora_state_dict(arts: list[ConceptArtifact], scales: list[float] | None = None) -> dict[str, torch.Tensor]:
    """peft-format keys ("unet.….to_q.lora_A.weight") for the merged set `arts`."""
    if not arts:
        raise ValueError("nothing to export: no concepts given")
    scales = scales or [1.0] * len(arts)
    layout = arts[0].meta.layout
    for a in arts[1:]:
        if a.meta.layout != layout or a.meta.base_fingerprint != arts[0].meta.base_fingerprint:
            raise ValueError(f"{a.name!r} was trained for another base or layer set than {arts[0].name!r}")
    out: dict[str, torch.Tensor] = {}
    for key, (m, _n) in layout.items():
        a_stack = torch.cat([a.factors(key)[0].float() for a in arts])  # (Σr, n)
        b_full = torch.zeros(m, a_stack.shape[0])  # (m, Σr)
        col = 0
        for art, s in zip(arts, scales):
            r = art.meta.adapter.rank
            b_full[art.rows(key), col:col + r] = s * art.factors(key)[1].float()
            col += r
        out[f"{key}.lora_A.weight"] = a_stack.contiguous()
        out[f"{key}.lora_B.weight"] = b_full
    return out


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
