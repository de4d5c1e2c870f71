import dataclasses

import pytest
import torch

from benchmarks.baselines import METHODS, merge_deltas
from blocklora.config import ROW_LAYOUTS, AdapterConfig
from blocklora.method import merge
from blocklora.method.inject import eject, inject
from blocklora.method.merge import LiveMerge
from blocklora.method.overlap import pairwise_stats, summary
from blocklora.method.partition import row_count
from blocklora.pipeline.base import load_base
from core_helpers import make_artifact

CFG = AdapterConfig(text_targets=("q_proj", "v_proj"))


def _unet_out(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ids = base.pipe.tokenizer(["a <blk3> dog", "a <blk7> cat"], padding="max_length", max_length=16,
                              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = base.pipe.text_encoder(ids)[0]
        return base.pipe.unet(x, torch.tensor([10, 500]), ctx).sample


def test_merged_equals_unmerged_layers_active(tiny_base):
    art = make_artifact(tiny_base, CFG, "a", slot=3, b_scale=0.5)
    lm = LiveMerge(tiny_base, CFG)
    # reference: the base with slot 3's BlockLoRA layers active, fed the artifact's parameters
    layers = inject(tiny_base.pipe, CFG, slot=3)
    with torch.no_grad():
        for key, layer in layers.items():
            layer.lora_A.copy_(art.tensors[f"{key}.lora_A"])
            layer.lora_B.copy_(art.tensors[f"{key}.lora_B"])
            layer.eval()
        emb = tiny_base.pipe.text_encoder.get_input_embeddings().weight
        tok = tiny_base.pipe.tokenizer.convert_tokens_to_ids("<blk3>")
        saved = emb[tok].clone()
        emb[tok] = art.tensors["text_encoder.token_embeds"][0]
    reference = _unet_out(tiny_base)
    with torch.no_grad():
        emb[tok] = saved
    eject(tiny_base.pipe)
    base_out = _unet_out(tiny_base)
    lm.add(art)
    merged = _unet_out(tiny_base)
    assert not torch.allclose(reference, base_out, atol=1e-3)  # the concept does something
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-5)


def test_two_concepts_rows_equal_single_merges_and_removal_is_exact(tiny_base):
    a = make_artifact(tiny_base, CFG, "a", slot=2, seed=1)
    b = make_artifact(tiny_base, CFG, "b", slot=9, seed=2)
    lm = LiveMerge(tiny_base, CFG)
    w0 = {k: lin.weight.clone() for k, lin in lm.targets.items()}
    table0 = tiny_base.pipe.text_encoder.get_input_embeddings().weight.clone()
    single = {}
    for art in (a, b):
        lm.add(art)
        single[art.name] = {k: lin.weight.clone() for k, lin in lm.targets.items()}
        lm.remove(art.name)
    lm.set([b, a])  # order does not matter
    for k, lin in lm.targets.items():
        for art in (a, b):
            rows = art.rows(k)
            assert torch.equal(lin.weight[rows], single[art.name][k][rows])
    lm.remove("a")
    for k, lin in lm.targets.items():
        assert torch.equal(lin.weight[a.rows(k)], w0[k][a.rows(k)])  # base rows back, bit for bit
        assert torch.equal(lin.weight[b.rows(k)], single["b"][k][b.rows(k)])  # b untouched
    lm.remove("b")
    assert all(torch.equal(lin.weight, w0[k]) for k, lin in lm.targets.items())
    assert torch.equal(tiny_base.pipe.text_encoder.get_input_embeddings().weight, table0)


def test_scales_and_mean_convention(tiny_base):
    arts = [make_artifact(tiny_base, CFG, n, slot=s, seed=s) for n, s in (("a", 0), ("b", 5), ("c", 11))]
    lm = LiveMerge(tiny_base, CFG)
    w0 = {k: lin.weight.clone() for k, lin in lm.targets.items()}
    lm.set(arts, "mean")
    expected = merge_deltas(arts, "mean")
    for k, lin in lm.targets.items():
        torch.testing.assert_close(lin.weight - w0[k], expected[k], rtol=1e-5, atol=1e-6)
    lm.set(arts[:1], [0.5])
    assert set(lm.live) == {"a"} and lm.live["a"].scale == 0.5


def test_refusals_change_nothing(tiny_base):
    lm = LiveMerge(tiny_base, CFG)
    a = make_artifact(tiny_base, CFG, "a", slot=2)
    lm.add(a)
    snapshot = {k: lin.weight.clone() for k, lin in lm.targets.items()}
    with pytest.raises(ValueError, match="already merged"):
        lm.add(a)
    with pytest.raises(ValueError, match="slot 2 is already held by concept 'a'"):
        lm.add(make_artifact(tiny_base, CFG, "other", slot=2))
    with pytest.raises(KeyError, match="'ghost' is not merged"):
        lm.remove("ghost")
    assert all(torch.equal(lin.weight, snapshot[k]) for k, lin in lm.targets.items())


def test_weight_space_stats_zero_for_blocks_nonzero_for_plain_lora(tiny_base):
    def deltas(cfg):
        arts = [make_artifact(tiny_base, cfg, f"c{i}", slot=i, seed=i) for i in range(4)]
        return {a.name: {k: a.delta(k) for k in a.meta.layout} for a in arts}

    for layout in ROW_LAYOUTS:
        ours = summary(pairwise_stats(deltas(dataclasses.replace(CFG, row_layout=layout))))
        assert ours["max_abs_cosine"] == 0.0 and ours["mean_sign_conflict"] == 0.0, layout
    plain = summary(pairwise_stats(deltas(METHODS["lora-sum"].adapter_config(CFG))))
    assert plain["mean_abs_cosine"] > 0 and plain["mean_sign_conflict"] > 0.2


@pytest.mark.parametrize("layout", ROW_LAYOUTS)
@pytest.mark.parametrize("chunk_bytes", [0, merge.CPU_CHUNK_BYTES], ids=["layer-by-layer", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_merge_is_the_dense_merge_bit_for_bit_and_keeps_rows_in_the_base_dtype(dtype, chunk_bytes, layout,
                                                                                       monkeypatch):
    """The merge batched over chunks of same-shaped layers (or one layer at a time) equals
    W0 + Σ α ΔW computed layer by layer in fp32 and rounded once, in any order, and removal
    restores W0 exactly; the rows saved for it are the base's dtype and no more than the concept's."""
    monkeypatch.setattr(merge, "CPU_CHUNK_BYTES", chunk_bytes)
    base = load_base("tiny", dtype=dtype)
    cfg = dataclasses.replace(CFG, row_layout=layout)
    arts = [make_artifact(base, cfg, n, slot=s, seed=s, b_scale=0.5) for n, s in (("a", 1), ("b", 6), ("c", 15))]
    scales = [1.0, 0.5, -2.0]
    lm = LiveMerge(base, cfg)
    layers_per_op = len(lm.targets) / len(lm.chunks)  # the tiny UNet's targets share shapes: work is batched
    assert layers_per_op == 1 if chunk_bytes == 0 else layers_per_op > 1
    w0 = {k: lin.weight.clone() for k, lin in lm.targets.items()}
    expected = {k: w.clone() for k, w in w0.items()}
    for art, s in zip(arts, scales):
        for k in expected:
            expected[k][art.rows(k)] = (w0[k][art.rows(k)].float() + s * art.delta_rows(k)).to(dtype)
    lm.set(arts, scales)
    first = {k: lin.weight.clone() for k, lin in lm.targets.items()}
    assert all(torch.equal(first[k], expected[k]) for k in expected)
    for lv in lm.live.values():
        assert all(t.dtype == dtype for t in lv.saved_rows)
        own = sum(row_count(lv.artifact.rows(k), w0[k].shape[0]) * w0[k].shape[1] for k in w0)
        assert sum(t.numel() for t in lv.saved_rows) == own
    lm.set([])
    assert all(torch.equal(lin.weight, w0[k]) for k, lin in lm.targets.items())
    lm.set(arts[::-1], scales[::-1])
    assert all(torch.equal(lin.weight, first[k]) for k, lin in lm.targets.items())
    lm.remove("b")
    lm.remove("a")
    lm.remove("c")
    assert all(torch.equal(lin.weight, w0[k]) for k, lin in lm.targets.items())


def test_merge_follows_weights_that_were_replaced_after_it_kept_their_views():
    """LiveMerge keeps views of each slot's rows; when a weight gets new storage (a pipeline moved or
    reloaded in place), a remove or add writes into the weight as it is now, not the old storage."""
    base = load_base("tiny")
    art = make_artifact(base, CFG, "a", slot=3, seed=0, b_scale=0.5)
    lm = LiveMerge(base, CFG)
    w0 = {k: lin.weight.clone() for k, lin in lm.targets.items()}
    lm.add(art)
    merged = {k: lin.weight.clone() for k, lin in lm.targets.items()}
    for lin in lm.targets.values():
        lin.weight.data = lin.weight.data.clone()  # same values, new storage
    lm.remove("a")
    assert all(torch.equal(lin.weight, w0[k]) for k, lin in lm.targets.items())
    lm.add(art)
    assert all(torch.equal(lin.weight, merged[k]) for k, lin in lm.targets.items())
