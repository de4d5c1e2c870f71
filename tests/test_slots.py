"""The concept-slot core (blocklora/method/slots.py) on the tiny base: a pure, comparable SlotSpace read
without touching the base, one compatibility check, and the pipeline binding's trigger rows."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from blocklora.config import AdapterConfig
from blocklora.method.artifact import InvalidArtifact
from blocklora.method.slots import PipelineSlots, SlotSpace, phrases
from blocklora.method.tokens import token_ids
from blocklora.pipeline.base import load_base
from core_helpers import make_artifact

CFG = AdapterConfig(rank=2, num_slots=4, text_targets=("q_proj",))


def test_space_is_pure_and_compares_by_value(tiny_base):
    table = tiny_base.pipe.text_encoder.get_input_embeddings().weight.clone()
    vocab = len(tiny_base.pipe.tokenizer)
    space = SlotSpace.of(tiny_base, CFG)
    assert len(tiny_base.pipe.tokenizer) == vocab  # no slot token added
    assert torch.equal(tiny_base.pipe.text_encoder.get_input_embeddings().weight, table)
    bound = PipelineSlots(tiny_base, CFG)  # this one does add the tokens ...
    assert len(tiny_base.pipe.tokenizer) == vocab + CFG.num_slots
    fresh = SlotSpace.of(load_base("tiny"), CFG)
    assert bound.space == space == fresh and hash(space) == hash(fresh)  # ... but reads the same value
    assert SlotSpace.of(tiny_base, CFG) == space  # nor do the added tokens change what fits
    assert space != SlotSpace.of(tiny_base, dataclasses.replace(CFG, rank=3))
    assert space.hidden == {"text_encoder": 32}
    assert set(space.layout) == set(bound.targets) and any(k.startswith("text_encoder.") for k in space.layout)


def test_space_crosses_json_whole(tiny_base):
    """What the coordinator receives (`to_dict`, JSON at the Ray edge) is the space it was made from."""
    space = SlotSpace.of(tiny_base, CFG)
    back = SlotSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert back == space and hash(back) == hash(space) and back.resolution == tiny_base.resolution


def _with_meta(art, **changes):
    return dataclasses.replace(art, meta=dataclasses.replace(art.meta, **changes))


def _with_embeds(art, embeds):
    kept = {k: v for k, v in art.tensors.items() if not k.endswith(".token_embeds")}
    return dataclasses.replace(art, tensors={**kept, **{f"{c}.token_embeds": v for c, v in embeds.items()}})


REFUSALS = {  # case -> (turn a good artifact bad, or the live set it meets; the message)
    "other base": (lambda a: (_with_meta(a, base_fingerprint="f" * 64), {}), "trained on base ffffffffffff"),
    "other adapter": (lambda a: (_with_meta(a, adapter=dataclasses.replace(CFG, rank=3)), {}), "this federation uses"),
    "other layers": (lambda a: (_with_meta(a, layout={k: v for k, v in list(a.meta.layout.items())[1:]}), {}),
                     "other layers or shapes"),
    "other width": (lambda a: (_with_embeds(a, {"text_encoder": torch.zeros(1, 8)}), {}), "width 8"),
    "unknown encoder": (lambda a: (_with_embeds(a, {**a.token_embeds(), "text_encoder_2": torch.zeros(1, 32)}), {}),
                        "'text_encoder_2', which this base does not have"),
    "name live": (lambda a: (a, {a.name: 3}), "already live"),
    "slot held": (lambda a: (a, {"other": a.meta.slot}), "slot 1 is already held by concept 'other'"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_check_names_what_does_not_fit(tiny_base, case):
    space = SlotSpace.of(tiny_base, CFG)
    good = make_artifact(tiny_base, CFG, "pet", slot=1)
    space.check(good)
    space.check(good, {"other": 2})
    make, message = REFUSALS[case]
    art, live = make(good)
    with pytest.raises(InvalidArtifact, match=message):
        space.check(art, live)


def test_trigger_rows_by_encoder_and_exact_restore(tiny_base):
    slots = PipelineSlots(tiny_base, CFG)
    art = make_artifact(tiny_base, CFG, "pet", slot=2, seed=3)
    assert slots.token_ids["text_encoder"][2] == token_ids(tiny_base, 2, 1)["text_encoder"]
    table0 = slots.table("text_encoder").clone()
    saved = slots.write_triggers(art)
    ids, vec = slots.triggers(art)["text_encoder"]
    assert torch.equal(slots.table("text_encoder")[ids], vec)
    slots.restore_triggers(art, saved)
    assert torch.equal(slots.table("text_encoder"), table0)
    assert phrases([art]) == {"pet": "<blk2> dog"}


def test_factors_are_the_delta_rows(tiny_base):
    art = make_artifact(tiny_base, CFG, "pet", slot=1, seed=2)
    for key in art.meta.layout:
        a, b_rows = art.factors(key)
        rows = art.rows(key)
        assert a.shape == (CFG.rank, art.meta.layout[key][1]) and b_rows.shape == (rows.stop - rows.start, CFG.rank)
        # delta() forms B_R A with `bmm` (blocklora.method.partition.block_delta), `@` here is `mm`: other
        # BLAS kernels on some CPUs, so equal to float32 rounding, not bit for bit
        torch.testing.assert_close(art.delta(key)[art.rows(key)], b_rows @ a)
