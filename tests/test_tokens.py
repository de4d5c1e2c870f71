import torch

from blocklora.method.tokens import add_slot_tokens, token_ids, trigger_names, wrap_token_embeddings


def test_every_slot_gets_distinct_fixed_token_ids(tiny_base):
    add_slot_tokens(tiny_base, num_slots=16, tokens_per_concept=2)
    ids = [i for k in range(16) for i in token_ids(tiny_base, k, 2)["text_encoder"]]
    assert len(set(ids)) == 32 and min(ids) == 49408  # appended after CLIP's 49,408 tokens
    enc = tiny_base.pipe.tokenizer("a <blk3> <blk3_1> dog", add_special_tokens=False).input_ids
    assert enc[1:3] == token_ids(tiny_base, 3, 2)["text_encoder"]  # each trigger is one token
    add_slot_tokens(tiny_base, 16, 2)  # idempotent
    assert len(tiny_base.pipe.tokenizer) == 49408 + 32


def test_new_rows_are_deterministic(tiny_base):
    from blocklora.pipeline.base import load_base

    other = load_base("tiny")
    for b in (tiny_base, other):
        add_slot_tokens(b, 4, 1)
    w1 = tiny_base.pipe.text_encoder.get_input_embeddings().weight
    w2 = other.pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(w1, w2)


def test_override_trains_only_the_concept_vectors(tiny_base):
    add_slot_tokens(tiny_base, 4, 1)
    wrapper = wrap_token_embeddings(tiny_base, token_ids(tiny_base, 2, 1), "dog")["text_encoder"]
    dog = tiny_base.pipe.tokenizer("dog", add_special_tokens=False).input_ids
    table = wrapper.base.weight
    torch.testing.assert_close(wrapper.vectors[0], table[dog].mean(0))  # starts at the class word
    ids = torch.tensor([tiny_base.pipe.tokenizer(f"a {trigger_names(2, 1)[0]} dog").input_ids])
    tiny_base.pipe.text_encoder(ids)[0].sum().backward()
    assert wrapper.vectors.grad is not None and wrapper.vectors.grad.abs().sum() > 0
    assert table.grad is None
