"""Random but well-formed concepts, for tests and benchmarks that need many of them fast."""

from __future__ import annotations

import torch

from blocklora.config import AdapterConfig
from blocklora.method.artifact import ConceptArtifact, ConceptMeta
from blocklora.method.partition import owned_rows, row_count
from blocklora.method.tokens import trigger_names


def random_artifact(name: str, slot: int, adapter: AdapterConfig, fingerprint: str,
                    layout: dict[str, tuple[int, int]], hidden: dict[str, int],
                    seed: int = 0, b_scale: float = 0.05, class_word: str = "thing") -> ConceptArtifact:
    """A concept with Gaussian A and (non-zero) B in `slot`'s rows: what training would ship."""
    g = torch.Generator().manual_seed(seed * 1009 + slot)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, (m, n) in layout.items():
        rows = owned_rows(m, adapter.num_slots, slot, adapter.blockwise, adapter.row_layout)
        a = torch.randn(adapter.rank, n, generator=g) / n ** 0.5
        factors[key] = (a, b_scale * torch.randn(row_count(rows, m), adapter.rank, generator=g))
    embeds = {comp: torch.randn(adapter.tokens_per_concept, d, generator=g) * 0.02 for comp, d in hidden.items()}
    meta = ConceptMeta(name=name, class_word=class_word, slot=slot, adapter=adapter, base_fingerprint=fingerprint,
                       layout=dict(layout), triggers=tuple(trigger_names(slot, adapter.tokens_per_concept)))
    return ConceptArtifact.from_parts(meta, factors, embeds)
