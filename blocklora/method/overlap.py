"""Overlap of a set of concepts in weight space: are their updates orthogonal, do they fight?
`blocklora inspect` prints it for the artifacts it is given."""

from __future__ import annotations

import itertools

import torch


def flatten(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """All dW of one concept as one vector, in key order."""
    return torch.cat([deltas[k].reshape(-1).float() for k in sorted(deltas)])


def pairwise_stats(concepts: dict[str, dict[str, torch.Tensor]]) -> list[dict]:
    """For every pair: cosine similarity of the flattened dW, and the sign-conflict fraction —
    the share of all weight entries where both updates are non-zero and of opposite sign."""
    flat = {name: flatten(d) for name, d in concepts.items()}
    out = []
    for a, b in itertools.combinations(sorted(flat), 2):
        x, y = flat[a], flat[b]
        if x.shape != y.shape:
            raise ValueError(f"{a} and {b} cover different layers or shapes")
        denom = x.norm() * y.norm()
        cos = float((x @ y) / denom) if denom > 0 else 0.0
        conflict = float(((x * y) < 0).float().mean())
        out.append({"a": a, "b": b, "cosine": cos, "sign_conflict": conflict})
    return out


def summary(pairs: list[dict]) -> dict[str, float]:
    """Mean |cosine| and mean sign conflict over pairs (0.0 for an empty set)."""
    if not pairs:
        return {"mean_abs_cosine": 0.0, "mean_sign_conflict": 0.0, "max_abs_cosine": 0.0}
    cos = [abs(p["cosine"]) for p in pairs]
    return {"mean_abs_cosine": sum(cos) / len(cos), "max_abs_cosine": max(cos),
            "mean_sign_conflict": sum(p["sign_conflict"] for p in pairs) / len(pairs)}
