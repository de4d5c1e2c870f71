"""Concepts in the slots of one base: the one place that knows what fits a base and where a slot's
rows and trigger tokens are.

Two parts, because two kinds of owner need them:
- `SlotSpace`, a pure value read once from a base without touching it: the base's fingerprint, the
  adapter, the layout {target key: (m, n)}, each text encoder's embedding width and the base's native
  resolution. Whoever only validates (the federation's registry) holds this and nothing else, and
  needs no diffusers to do it: the coordinator gets it as JSON (`to_dict`) from whoever starts it,
  so a restarted coordinator is back in about a second instead of re-importing and re-loading the
  base. It is frozen, hashable and comparable, so "same base and federation shape" is `==`.
- `PipelineSlots`, bound to a pipeline its owner is about to change: the slot tokens added, the
  target linears found, every slot's trigger-token ids per text encoder. `LiveMerge` (merged
  weights), `blocklora.method.residual.ConceptBank` (per-request residuals) and the baselines' residual
  application compose it; each decides only how a concept's rows reach the forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

from blocklora.config import AdapterConfig, from_dict
from blocklora.method.artifact import ConceptArtifact, InvalidArtifact
from blocklora.method.inject import find_targets, layout
from blocklora.method.tokens import add_slot_tokens, token_ids

if TYPE_CHECKING:
    from blocklora.pipeline.base import Base


@dataclass(frozen=True)
class SlotSpace:
    """What a concept must agree with to live in this base's slots (tuples, so it hashes)."""

    fingerprint: str
    adapter: AdapterConfig
    shapes: tuple[tuple[str, tuple[int, int]], ...]  # (target key, (m, n)) in module order
    widths: tuple[tuple[str, int], ...]  # (text-encoder component, token-embedding width d)
    resolution: int  # the base's native picture size: what its concepts are trained at

    @classmethod
    def of(cls, base: Base, adapter: AdapterConfig) -> "SlotSpace":
        """Read from `base` as it is: no token is added and no layer wrapped."""
        return cls(base.fingerprint, adapter, tuple(layout(base.pipe, adapter).items()),
                   tuple((c, te.get_input_embeddings().weight.shape[1]) for c, te in base.text_encoders.items()),
                   base.resolution)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for the Ray edge to the coordinator; `from_dict` gives back an equal space."""
        return {"fingerprint": self.fingerprint, "adapter": dataclasses.asdict(self.adapter),
                "shapes": [[key, list(mn)] for key, mn in self.shapes], "widths": [list(w) for w in self.widths],
                "resolution": self.resolution}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SlotSpace":
        return cls(data["fingerprint"], from_dict(AdapterConfig, data["adapter"]),
                   tuple((key, (int(m), int(n))) for key, (m, n) in data["shapes"]),
                   tuple((comp, int(d)) for comp, d in data["widths"]), int(data["resolution"]))

    @property
    def layout(self) -> dict[str, tuple[int, int]]:
        """Target key -> (m, n) of its base weight."""
        return dict(self.shapes)

    @property
    def hidden(self) -> dict[str, int]:
        """Text-encoder component -> width of its token embeddings."""
        return dict(self.widths)

    def check(self, art: ConceptArtifact, live: Mapping[str, int] | None = None) -> None:
        """Refuse an artifact made for another base, federation shape or targets, or one that
        collides with `live` (concept name -> slot) by name or slot. Raises InvalidArtifact."""
        m, layout, hidden = art.meta, self.layout, self.hidden
        if m.base_fingerprint != self.fingerprint:
            raise InvalidArtifact(f"concept {m.name!r} was trained on base {m.base_fingerprint[:12]}…, "
                                  f"this is base {self.fingerprint[:12]}…")
        mine = dataclasses.replace(m.adapter, erasure=self.adapter.erasure)  # λ is a training choice, free per concept
        if mine != self.adapter:
            raise InvalidArtifact(f"concept {m.name!r} has adapter {m.adapter}, this federation uses {self.adapter}")
        if m.layout != layout:
            diff = sorted(set(m.layout) ^ set(layout)) or [k for k in layout if m.layout[k] != layout[k]]
            raise InvalidArtifact(f"concept {m.name!r} targets other layers or shapes than this base: {diff[:3]}")
        embeds = art.token_embeds()
        for comp, v in embeds.items():
            if comp not in hidden:
                raise InvalidArtifact(f"token embeddings for {comp!r}, which this base does not have")
            if v.shape[1] != hidden[comp]:
                raise InvalidArtifact(f"{comp}.token_embeds has width {v.shape[1]}; "
                                      f"the text encoder's is {hidden[comp]}")
        if set(embeds) != set(hidden):
            raise InvalidArtifact(f"token embeddings for {sorted(embeds)}, base has {sorted(hidden)}")
        live = live or {}
        if m.name in live:
            raise InvalidArtifact(f"concept {m.name!r} is already live here (already merged); remove it first")
        taken = {slot: name for name, slot in live.items()}
        if m.slot in taken:
            raise InvalidArtifact(f"slot {m.slot} is already held by concept {taken[m.slot]!r}")


class PipelineSlots:
    """A loaded base made ready to hold concepts: slot tokens added (idempotent), targets found.

    `space` is read before the tokens are added, so it equals `SlotSpace.of` on a fresh load of
    the same base, which is what a federation that never touches a pipeline holds.
    """

    def __init__(self, base: Base, adapter: AdapterConfig) -> None:
        self.space = SlotSpace.of(base, adapter)
        self.base, self.adapter = base, adapter
        add_slot_tokens(base, adapter.num_slots, adapter.tokens_per_concept)
        self.targets: dict[str, nn.Linear] = find_targets(base.pipe, adapter)
        per_slot = [token_ids(base, k, adapter.tokens_per_concept) for k in range(adapter.num_slots)]
        # text-encoder component -> (K, t) trigger ids: slot k's tokens in row k
        self.token_ids: dict[str, list[list[int]]] = {comp: [ids[comp] for ids in per_slot]
                                                     for comp in base.text_encoders}

    def check(self, art: ConceptArtifact, live: Mapping[str, int] | None = None) -> None:
        self.space.check(art, live)

    def triggers(self, art: ConceptArtifact) -> dict[str, tuple[list[int], torch.Tensor]]:
        """Text-encoder component -> (the ids of art's slot tokens, art's vectors for them (t, d))."""
        embeds = art.token_embeds()
        return {comp: (ids[art.meta.slot], embeds[comp]) for comp, ids in self.token_ids.items()}

    def table(self, comp: str) -> torch.Tensor:
        """The token-embedding table (vocab, d) of text encoder `comp`."""
        return self.base.text_encoders[comp].get_input_embeddings().weight

    @torch.no_grad()
    def write_triggers(self, art: ConceptArtifact) -> dict[str, torch.Tensor]:
        """Write art's trigger vectors into the embedding tables; returns the rows they replaced."""
        saved = {}
        for comp, (ids, vec) in self.triggers(art).items():
            table = self.table(comp)
            saved[comp] = table[ids].clone()
            table[ids] = vec.to(table.device, table.dtype)
        return saved

    @torch.no_grad()
    def restore_triggers(self, art: ConceptArtifact, saved: Mapping[str, torch.Tensor]) -> None:
        """Put back the rows `write_triggers(art)` returned, bit for bit."""
        for comp, (ids, _) in self.triggers(art).items():
            self.table(comp)[ids] = saved[comp]


def phrase(art: ConceptArtifact) -> str:
    """What `{name}` in a prompt expands to, e.g. '<blk3> dog'."""
    return " ".join(art.meta.triggers) + f" {art.meta.class_word}"


def phrases(arts: Iterable[ConceptArtifact]) -> dict[str, str]:
    """Concept name -> its phrase, for `blocklora.pipeline.prompts.expand`."""
    return {a.name: phrase(a) for a in arts}
