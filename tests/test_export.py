import torch

from blocklora.config import AdapterConfig
from blocklora.method.export import MergedFactors, export_lora
from blocklora.method.inject import find_targets
from blocklora.method.merge import LiveMerge
from blocklora.pipeline.base import load_base
from core_helpers import fused_weight, make_artifact

CFG = AdapterConfig(text_targets=("q_proj", "k_proj", "v_proj", "out_proj"))


def test_diffusers_load_lora_weights_reproduces_the_merged_weights(tiny_base, tmp_path):
    arts = [make_artifact(tiny_base, CFG, "a", 1, seed=1), make_artifact(tiny_base, CFG, "b", 6, seed=2)]
    paths = export_lora(arts, tmp_path, scales=[1.0, 0.5])
    LiveMerge(tiny_base, CFG).set(arts, [1.0, 0.5])
    ours = find_targets(tiny_base.pipe, CFG)

    theirs = load_base("tiny")
    w0 = {k: lin.weight.clone() for k, lin in find_targets(theirs.pipe, CFG).items()}
    theirs.pipe.load_lora_weights(str(tmp_path), weight_name=paths["lora"].name)
    theirs.pipe.fuse_lora()
    for key, lin in ours.items():
        fused = fused_weight(theirs.pipe, key)
        assert not torch.equal(fused, w0[key])  # the LoRA really was applied
        torch.testing.assert_close(fused, lin.weight, rtol=0, atol=1e-6)
    assert paths["a.text_encoder"].exists() and paths["b.text_encoder"].exists()


def test_merged_factors_hold_the_artifacts_own_tensors_and_their_exact_sum(tiny_base):
    arts = [make_artifact(tiny_base, CFG, "a", 1, seed=1), make_artifact(tiny_base, CFG, "b", 6, seed=2)]
    merged = MergedFactors(arts[0].meta.layout)
    for a in arts:
        merged.add(a)
    key = next(iter(arts[0].meta.layout))
    assert merged._parts["a"][key][1].data_ptr() == arts[0].factors(key)[0].data_ptr()  # no copy in the same dtype
    dense, lora = merged.dense(), merged.lora_state_dict({"a": 1.0, "b": 0.5})
    for k in arts[0].meta.layout:
        assert torch.equal(dense[k], arts[0].delta(k) + arts[1].delta(k))  # disjoint rows: exact
        stacked = lora[f"{k}.lora_B.weight"] @ lora[f"{k}.lora_A.weight"]
        torch.testing.assert_close(stacked, arts[0].delta(k) + 0.5 * arts[1].delta(k), rtol=1e-6, atol=1e-7)
    merged.remove("a")
    assert merged.names == ["b"] and all(torch.equal(v, arts[1].delta(k)) for k, v in merged.dense().items())
