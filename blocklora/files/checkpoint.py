"""Optimizer state as flat named tensors, so a resumable checkpoint is safetensors, never a pickle.

Keys are "<param index>.<state name>" (e.g. "3.exp_avg"), the index counting the optimizer's
parameters across its param groups in order; scalars such as Adam's `step` stay 0-dim tensors.
"""

from __future__ import annotations

import torch


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter's optimizer state (Adam's moments and step), on the CPU, by "<index>.<name>"."""
    return {f"{i}.{k}": torch.as_tensor(v).detach().cpu().contiguous()
            for i, p in enumerate(_params(opt)) for k, v in opt.state.get(p, {}).items()}


def load_optimizer_tensors(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Put state written by `optimizer_tensors` back on the optimizer's parameters (their device)."""
    for i, p in enumerate(_params(opt)):
        state = {k.split(".", 1)[1]: v.reshape(()) if k.endswith(".step") else v.to(p.device)
                 for k, v in flat.items() if k.startswith(f"{i}.")}
        if state:
            opt.state[p] = state
