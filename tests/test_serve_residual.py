"""Per-request subset residuals (blocklora/method/residual.py) against LiveMerge's merged weights, no Ray.

The claim under test: a sample asking for concepts S with weights α gets exactly the UNet output of a
pipeline whose weights are W0 + Σ_{i∈S} α_i dW_i, whatever other samples in the batch ask for.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.synthetic import random_artifact
from blocklora.config import AdapterConfig
from blocklora.method.merge import LiveMerge
from blocklora.method.residual import KERNELS, ConceptBank
from blocklora.pipeline.base import load_base
from blocklora.pipeline.conditioning import encode_prompts
from core_helpers import make_artifact

ADAPTERS = {
    "unet-only": AdapterConfig(rank=4, num_slots=4),
    "uneven-rows+text": AdapterConfig(rank=2, num_slots=3, text_targets=("q_proj", "v_proj")),
    "strided-rows": AdapterConfig(rank=2, num_slots=3, row_layout="strided"),
}
PROMPT = "a photo of <blk0> <blk1> <blk2> on a beach"  # every slot's trigger, so token rows matter


def unet_out(base, prompts: list[str], cfg_doubled: bool = False, seeds: list[int] | None = None) -> torch.Tensor:
    """One UNet call on latents seeded per sample; with `cfg_doubled`, the batch is [uncond; cond] as in CFG."""
    seeds = seeds or list(range(len(prompts)))
    latents = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        cond, _ = encode_prompts(base, prompts)
        if cfg_doubled:
            uncond, _ = encode_prompts(base, [""] * len(prompts))
            cond, latents = torch.cat([uncond, cond]), torch.cat([latents, latents])
        return base.pipe.unet(latents, torch.tensor(500), cond).sample


@pytest.fixture(params=list(ADAPTERS))
def setup(request):
    """(bank over one tiny base, LiveMerge over another, the adapter, three concepts)."""
    cfg = ADAPTERS[request.param]
    served, merged = load_base("tiny"), load_base("tiny")
    arts = [make_artifact(served, cfg, name, slot, seed=slot + 1) for slot, name in enumerate("abc")]
    bank = ConceptBank(served, cfg)
    for art in arts:
        bank.add(art)
    return bank, LiveMerge(merged, cfg), cfg, {a.name: a for a in arts}


def reference(live: LiveMerge, arts: dict, subset: dict[str, float], prompts: list[str], **kw) -> torch.Tensor:
    live.set([arts[n] for n in subset], list(subset.values()))
    return unet_out(live.base, prompts, **kw)


SUBSETS = [{}, {"a": 1.0}, {"b": 1.0, "c": 1.0}, {"a": 0.5, "c": -1.5}, {"a": 1.0, "b": 1.0, "c": 1.0}]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s) or "none")
def test_subset_equals_merged_weights(setup, subset):
    bank, live, _, arts = setup
    with bank.subsets([subset]):
        got = unet_out(bank.base, [PROMPT])
    torch.testing.assert_close(got, reference(live, arts, subset, [PROMPT]), atol=2e-5, rtol=1e-4)


def test_mixed_subsets_in_one_batch_equal_separate_runs(setup):
    bank, _, _, _ = setup
    prompts = [PROMPT, "a dog", PROMPT, PROMPT, PROMPT]
    with bank.subsets(SUBSETS):
        mixed = unet_out(bank.base, prompts, cfg_doubled=True)  # also checks α follows the CFG doubling
    n = len(SUBSETS)
    for i, subset in enumerate(SUBSETS):
        with bank.subsets([subset]):
            alone = unet_out(bank.base, [prompts[i]], cfg_doubled=True, seeds=[i])
        torch.testing.assert_close(mixed[[i, n + i]], alone, atol=2e-5, rtol=1e-4)


def test_cfg_batch_matches_merged_uncond_and_cond(setup):
    bank, live, _, arts = setup
    subset = {"b": 1.0}
    with bank.subsets([subset]):
        got = unet_out(bank.base, [PROMPT], cfg_doubled=True)
    torch.testing.assert_close(got, reference(live, arts, subset, [PROMPT], cfg_doubled=True), atol=2e-5, rtol=1e-4)


def test_remove_drops_the_concept_and_restores_the_base_exactly(setup):
    bank, _, cfg, arts = setup
    fresh = load_base("tiny")
    LiveMerge(fresh, cfg)  # the same slot tokens, nothing merged
    with bank.subsets([{"b": 1.0}]):
        with_b = unet_out(bank.base, [PROMPT])
    bank.remove("a")
    with pytest.raises(KeyError, match="a"):
        bank.alpha([{"a": 1.0}])
    with bank.subsets([{"b": 1.0}]):
        torch.testing.assert_close(unet_out(bank.base, [PROMPT]), with_b, atol=0, rtol=0)  # b untouched
    for name in ("b", "c"):
        bank.remove(name)
    assert bank.factors == {} and bank.triggers == {}
    with bank.subsets([{}]):
        assert torch.equal(unet_out(bank.base, [PROMPT]), unet_out(fresh, [PROMPT]))  # tokens restored too


def test_concepts_sharing_a_slot_serve_different_samples_of_one_batch(setup):
    """A library holds several concepts per slot: one sample may not merge two of them (named
    refusal), but samples of one batch may each use another concept of the same slot, and each gets
    exactly its own merged weights, its slot's trigger reading its own vectors."""
    bank, live, _, arts = setup
    space = bank.slots.space
    other = random_artifact("other", 0, bank.adapter, space.fingerprint, space.layout, space.hidden, seed=9)
    bank.add(other)
    with pytest.raises(ValueError, match="'a' and 'other' are both in slot 0"):
        bank.alpha([{"a": 1.0, "other": 1.0}])
    with pytest.raises(ValueError, match="already live"):
        bank.add(arts["a"])
    batch = [{"a": 1.0, "b": 1.0}, {"other": 1.0, "b": 1.0}, {"other": -0.5}]
    with bank.subsets(batch):
        mixed = unet_out(bank.base, [PROMPT] * 3, cfg_doubled=True)
    everything = {**arts, "other": other}
    for i, subset in enumerate(batch):
        torch.testing.assert_close(mixed[[i, 3 + i]], reference(live, everything, subset, [PROMPT], cfg_doubled=True,
                                                                seeds=[i]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 3e-3)], ids=["fp32", "fp16"])
def test_mixed_batch_equals_fused_weights_per_sample_in_each_dtype(dtype, tol, kernel):
    """Every sample of one mixed batch matches the pipeline merged with its own subset (LiveMerge),
    in fp32 and in half precision, where bank and merged weights both live in the base's dtype."""
    cfg = ADAPTERS["unet-only"]
    served, merged = load_base("tiny", dtype=dtype), load_base("tiny", dtype=dtype)
    arts = {a.name: a for a in (make_artifact(served, cfg, name, slot, seed=slot + 1, b_scale=0.5)
                                for slot, name in enumerate("abc"))}
    bank, live = ConceptBank(served, cfg, kernel=kernel), LiveMerge(merged, cfg)
    for art in arts.values():
        bank.add(art)
    assert all(a.dtype == dtype for f in bank.factors.values() for _, a, _ in f.values())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(SUBSETS), 4, 16, 16, generator=g).to(dtype)
    ctx = (torch.randn(len(SUBSETS), 8, served.pipe.unet.config.cross_attention_dim, generator=g) * 0.5).to(dtype)
    t = torch.tensor(500)
    with torch.no_grad(), bank.subsets(SUBSETS):
        mixed = served.pipe.unet(x, t, ctx).sample
    with torch.no_grad():
        base_out = merged.pipe.unet(x, t, ctx).sample
    for i, subset in enumerate(SUBSETS):
        live.set([arts[n] for n in subset], list(subset.values()))
        with torch.no_grad():
            fused = merged.pipe.unet(x[i:i + 1], t, ctx[i:i + 1]).sample[0]
        if subset:
            assert (fused - base_out[i]).abs().max() > 10 * tol  # the concepts change the output
        torch.testing.assert_close(mixed[i], fused, atol=tol, rtol=tol)


def test_kernels_agree_and_switching_takes_effect_at_the_next_batch(setup):
    """Switching a live bank's kernel changes how, not what: both kernels give the same mixed CFG batch
    (the other tests check `gathered` against merged weights, and both kernels in fp32 and fp16)."""
    bank, _, _, _ = setup
    prompts = [PROMPT] * len(SUBSETS)
    outs = {}
    for kernel in KERNELS:
        bank.kernel = kernel
        assert all(layer.kernel == kernel for layer in bank.layers.values())
        with bank.subsets(SUBSETS):
            outs[kernel] = unet_out(bank.base, prompts, cfg_doubled=True)
    torch.testing.assert_close(outs["union"], outs["gathered"], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown residual kernel 'fast'"):
        bank.kernel = "fast"
    assert bank.kernel == KERNELS[-1]  # the refused name changed nothing
