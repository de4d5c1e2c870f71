import pytest
import torch

from blocklora.config import AdapterConfig
from blocklora.method.inject import eject, find_targets, inject
from blocklora.method.layer import BlockLoRALinear
from blocklora.pipeline.base import tiny_sdxl_unet, tiny_unet


class _Pipe:
    """The attribute surface injection needs: components by name."""

    def __init__(self, unet, text_encoder=None):
        self.unet, self.text_encoder = unet, text_encoder


def _forward(unet, sdxl):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)} if sdxl else None
    return unet(x, 10, ctx, added_cond_kwargs=added).sample


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1x", "sdxl"])
def test_inject_wraps_self_and_cross_attention_and_eject_restores(sdxl):
    torch.manual_seed(0)
    unet = tiny_sdxl_unet() if sdxl else tiny_unet()
    pipe = _Pipe(unet)
    before = _forward(unet, sdxl)
    layers = inject(pipe, AdapterConfig(num_slots=16), slot=5)
    names = list(layers)
    assert any(".attn1.to_q" in n for n in names) and any(".attn2.to_k" in n for n in names)
    assert all(n.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for n in names)
    per_block = 4 * 2  # q, k, v, out of attn1 and attn2
    assert len(names) % per_block == 0
    if sdxl:  # transformer_layers_per_block=(1, 2): the 2-layer transformers are wrapped too
        assert any("transformer_blocks.1.attn2.to_v" in n for n in names)
    for layer in layers.values():  # B = 0 at init: the wrapped model is the base model
        layer.eval()
    torch.testing.assert_close(_forward(unet, sdxl), before)
    with pytest.raises(RuntimeError, match="already a BlockLoRALinear"):
        inject(pipe, AdapterConfig(num_slots=16), slot=6)
    removed = eject(pipe)
    assert set(removed) == set(names)
    assert not any(isinstance(m, BlockLoRALinear) for m in unet.modules())
    assert set(find_targets(pipe, AdapterConfig())) == set(names)


def test_text_encoder_targets(tiny_base):
    cfg = AdapterConfig(text_targets=("q_proj", "k_proj", "v_proj", "out_proj"))
    layers = inject(tiny_base.pipe, cfg, slot=0)
    try:
        te = [n for n in layers if n.startswith("text_encoder.")]
        assert len(te) == 4 * tiny_base.pipe.text_encoder.config.num_hidden_layers
    finally:
        eject(tiny_base.pipe)


def test_no_matching_target_names_the_suffixes():
    with pytest.raises(ValueError, match="no nn.Linear in the pipeline matches the targets"):
        find_targets(_Pipe(tiny_unet()), AdapterConfig(unet_targets=("nonexistent",)))
