import torch

from blocklora.base import load_base
from blocklora.config import AdapterConfig
from blocklora.export import export_lora
from blocklora.inject import find_targets
from blocklora.merge import LiveMerge
from core_helpers import make_artifact

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
        comp, _, path = key.partition(".")
        mod = getattr(theirs.pipe, comp).get_submodule(path)
        fused = (mod.base_layer if hasattr(mod, "base_layer") else mod).weight
        assert not torch.equal(fused, w0[key])  # the LoRA really was applied
        torch.testing.assert_close(fused, lin.weight, rtol=0, atol=1e-6)
    assert paths["a.text_encoder"].exists() and paths["b.text_encoder"].exists()
