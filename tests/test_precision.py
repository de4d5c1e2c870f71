"""Half precision: bf16 mixed-precision training keeps everything trained in float32 beside a bf16
base and writes a float32 artifact; combinations a device cannot run are refused before anything
changes; the precision names are checked where a config or the serve app is built."""

import pytest
import torch

from blocklora.config import AdapterConfig, PrecisionConfig, TrainConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.inject import find_targets
from blocklora.pipeline.base import load_base
from blocklora.pipeline.precision import base_dtype
from blocklora.training.data import load_concept_images
from blocklora.training.trainer import ConceptTrainer
from core_helpers import write_images

CFG = AdapterConfig(erasure=0.25, text_targets=("q_proj",))  # text-encoder layers too: both towers in bf16


def test_bf16_mixed_training_trains_fp32_beside_a_bf16_base(tmp_path):
    base = load_base("tiny", dtype=base_dtype("bf16"))
    frozen = {k: lin.weight.clone() for k, lin in find_targets(base.pipe, CFG).items()}
    images, captions = load_concept_images(write_images(tmp_path / "img"), 32)
    trainer = ConceptTrainer(base, CFG, TrainConfig(steps=3, resolution=32, mixed_precision="bf16"), 4, "pet", "dog")
    try:
        losses = [trainer.next_step(images, captions) for _ in range(3)]
        assert all(0 < loss < 10 for loss in losses)
        trained = [p for g in trainer.opt.param_groups for p in g["params"]]
        assert {p.dtype for p in trained} == {torch.float32}  # A, owned B rows and trigger vectors
        assert any(k.startswith("text_encoder.") for k in trainer.layers) and trainer.tokens
        state = [v for s in trainer.opt.state.values() for v in s.values() if v.is_floating_point() and v.dim()]
        assert state and {v.dtype for v in state} == {torch.float32}  # AdamW's moments
        for module in (base.pipe.unet, base.pipe.vae):
            assert {p.dtype for p in module.parameters() if not p.requires_grad} == {torch.bfloat16}
        assert trainer.tokens["text_encoder"].base.weight.dtype == torch.bfloat16
        art = trainer.artifact()
    finally:
        trainer.close()
    assert all(torch.equal(lin.weight, frozen[k]) for k, lin in find_targets(base.pipe, CFG).items())
    path = art.save(tmp_path / "pet.safetensors")
    back = ConceptArtifact.load(path)
    assert {v.dtype for v in back.tensors.values()} == {torch.float32}  # fp32 on the wire
    assert back.meta.train_config["mixed_precision"] == "bf16" and back.meta.train_config["steps_done"] == 3
    assert any(v.abs().sum() > 0 for k, v in back.tensors.items() if k.endswith("lora_B"))  # B learned


@pytest.mark.parametrize("mixed, dtype, says", [
    ("fp16", torch.float16, "needs a CUDA device"),  # no GradScaler / fp16 kernels on this CPU
    ("bf16", torch.float32, "trains on a torch.bfloat16 base"),  # the base must already be in the half dtype
])
def test_refused_before_the_base_changes(mixed, dtype, says):
    base = load_base("tiny", device="cpu", dtype=dtype)
    vocab = len(base.pipe.tokenizer)
    with pytest.raises(ValueError, match=says):
        ConceptTrainer(base, CFG, TrainConfig(mixed_precision=mixed), 0, "pet", "dog")
    assert len(base.pipe.tokenizer) == vocab  # no slot tokens added
    assert not any(type(m).__name__ == "BlockLoRALinear" for m in base.pipe.unet.modules())


def test_precision_names_are_checked_where_configs_are_built():
    from serve.app import AppArgs

    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        PrecisionConfig(dtype="half")
    with pytest.raises(ValueError, match="dtype must be one of"):
        AppArgs(dtype="int8")
    assert AppArgs(dtype="bfloat16").dtype == "bfloat16" and AppArgs().dtype == "float32"
