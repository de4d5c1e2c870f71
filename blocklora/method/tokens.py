"""Concept trigger tokens: one fixed set per slot, so tokens of different concepts never collide.

Every pipeline of a federation adds the same K x t tokens in the same order, so a trigger has the
same id on every client and every serve replica; a concept only ever writes its own rows of the
embedding table. During training the concept's vectors live in a small `TokenOverride` wrapper so
that only they receive gradients (and their own learning rate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: artifacts (and the CLI's inspect/merge) load without diffusers
    from blocklora.pipeline.base import Base


def trigger_names(slot: int, tokens_per_concept: int) -> list[str]:
    return [f"<blk{slot}>" if j == 0 else f"<blk{slot}_{j}>" for j in range(tokens_per_concept)]


def add_slot_tokens(base: Base, num_slots: int, tokens_per_concept: int) -> None:
    """Add every slot's trigger tokens to each tokenizer and grow each embedding table (idempotent)."""
    names = [n for k in range(num_slots) for n in trigger_names(k, tokens_per_concept)]
    for comp, te in base.text_encoders.items():
        tok = base.tokenizers[comp]
        vocab = tok.get_vocab()  # builds a 49k-entry dict on every call: once per tokenizer, not per name
        missing = [n for n in names if n not in vocab]
        if not missing:
            continue
        if len(missing) != len(names):
            raise ValueError(f"tokenizer already holds some but not all slot tokens ({len(missing)} missing); "
                             "it was prepared for a different slot count")
        old = te.get_input_embeddings().weight.shape[0]
        tok.add_tokens(names, special_tokens=False)
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():  # deterministic rows (resizing draws random ones): the table's mean
            w = te.get_input_embeddings().weight
            w[old:] = w[:old].mean(0)


def token_ids(base: Base, slot: int, tokens_per_concept: int) -> dict[str, list[int]]:
    """Text-encoder component name -> the ids of `slot`'s trigger tokens in its tokenizer."""
    names = trigger_names(slot, tokens_per_concept)
    ids = {comp: tok.convert_tokens_to_ids(names) for comp, tok in base.tokenizers.items()}
    for comp, per_tok in ids.items():
        if any(i is None or i == base.tokenizers[comp].unk_token_id for i in per_tok):
            raise KeyError(f"slot tokens {names} are not in the {comp} tokenizer; call add_slot_tokens first")
    return ids


def class_word_init(tokenizer, embedding: nn.Embedding, class_word: str, count: int) -> torch.Tensor:
    """Start each trigger at the mean embedding of the class word's tokens (the DreamBooth prior)."""
    ids = tokenizer(class_word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"class word {class_word!r} tokenizes to nothing")
    vec = embedding.weight[ids].mean(0)
    return vec.detach().clone().unsqueeze(0).repeat(count, 1)  # (t, d)


def rare_token_init(tokenizer, embedding: nn.Embedding, slot: int, count: int) -> torch.Tensor:
    """Slot `slot`'s fixed DreamBooth identifier (their "sks"): the embedding of a late, rarely
    merged BPE token of the base vocabulary ("kraken", "wether", ...), a different one per slot,
    the same vector for each of the concept's `count` trigger tokens."""
    token = tokenizer.vocab_size - 1000 - 3 * slot  # spaced so neighbouring slots differ clearly
    return embedding.weight[token].detach().clone().unsqueeze(0).repeat(count, 1)  # (t, d)


class TokenOverride(nn.Module):
    """Wraps a token embedding: the concept's ids read trainable vectors, all others the frozen table."""

    def __init__(self, base: nn.Embedding, ids: list[int], init: torch.Tensor,
                 dtype: torch.dtype | None = None) -> None:
        """`dtype` of the trainable vectors (None: the table's); float32 beside a half-precision table
        is mixed-precision training: they are cast to the table's dtype where they replace its rows."""
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device))
        self.vectors = nn.Parameter(init.to(base.weight.device, dtype or base.weight.dtype))  # (t, d)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight of the input embeddings
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        for j in range(self.ids.numel()):
            hit = (input_ids == self.ids[j]).unsqueeze(-1)  # (B, L, 1)
            out = torch.where(hit, self.vectors[j].to(out.dtype), out)
        return out


def wrap_token_embeddings(base: Base, ids: dict[str, list[int]], class_word: str,
                          rare_slot: int | None = None, dtype: torch.dtype | None = None) -> dict[str, TokenOverride]:
    """Install a TokenOverride on each text encoder (ids by component name), initialised from the
    class word (or, with `rare_slot`, from that slot's rare word: DB-LoRA's fixed identifier);
    trainable vectors in `dtype` (None: the table's)."""
    wrappers = {}
    for comp, te in base.text_encoders.items():
        emb = te.get_input_embeddings()
        if isinstance(emb, TokenOverride):
            raise RuntimeError("token embeddings are already wrapped")
        tok = base.tokenizers[comp]
        init = (class_word_init(tok, emb, class_word, len(ids[comp])) if rare_slot is None
                else rare_token_init(tok, emb, rare_slot, len(ids[comp])))
        w = TokenOverride(emb, ids[comp], init, dtype)
        te.set_input_embeddings(w)
        wrappers[comp] = w
    return wrappers


def unwrap_token_embeddings(base: Base) -> None:
    for te in base.text_encoders.values():
        emb = te.get_input_embeddings()
        if isinstance(emb, TokenOverride):
            te.set_input_embeddings(emb.base)
