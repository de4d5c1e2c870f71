import torch
from torch import nn

from blocklora.layer import BlockLoRALinear


def _layer(erasure=0.0, slot=2, seed=0):
    torch.manual_seed(seed)
    layer = BlockLoRALinear(nn.Linear(24, 40), rank=3, num_slots=8, slot=slot, erasure=erasure)
    nn.init.normal_(layer.lora_B)
    return layer


def test_owns_only_its_rows_and_cost_scales_with_them():
    layer = _layer()
    assert layer.lora_B.shape == (5, 3)  # 40 rows / 8 slots, not 40
    dw = layer.delta_weight()
    assert dw.shape == (40, 24)
    assert torch.count_nonzero(dw[:10]) == 0 and torch.count_nonzero(dw[15:]) == 0
    assert torch.count_nonzero(dw[10:15]) == 5 * 24


def test_eval_forward_equals_base_plus_delta_weight():
    layer = _layer(erasure=0.5).eval()
    x = torch.randn(4, 7, 24)
    expected = x @ (layer.base.weight + layer.delta_weight()).T + layer.base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_erasure_only_in_training_per_sample_and_unscaled():
    layer = _layer(erasure=0.5).train()
    x = torch.randn(64, 3, 24)
    res = layer(x) - layer.base(x)
    own = res[..., 10:15]
    full = (x @ layer.delta_weight().T)[..., 10:15]
    kept = torch.isclose(own, full, atol=1e-5)
    dropped = own.abs() < 1e-7
    assert (kept | dropped).all()  # each feature either kept unscaled or erased
    assert (kept.all(dim=1) | dropped.all(dim=1)).all()  # the mask is shared by a sample's tokens
    frac = dropped.all(dim=1).float().mean().item()
    assert 0.35 < frac < 0.65
    assert torch.count_nonzero(res[..., :10]) == 0


def test_gradients_reach_only_lora_params():
    layer = _layer(erasure=0.25).train()
    layer(torch.randn(2, 5, 24)).sum().backward()
    assert layer.base.weight.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_merge_matches_unmerged_and_unmerge_is_bit_exact():
    layer = _layer().eval()
    w0 = layer.base.weight.clone()
    x = torch.randn(3, 24)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)


def test_scale_reaches_delta_weight_forward_and_merge():
    layer = _layer().eval()
    full = layer.delta_weight()
    layer.scale = 0.5
    assert torch.equal(layer.delta_weight(), 0.5 * full)
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), x @ (layer.base.weight + layer.delta_weight()).T + layer.base.bias,
                               rtol=1e-5, atol=1e-5)
    w0 = layer.base.weight.clone()
    layer.merge()
    assert torch.equal(layer.base.weight, w0 + layer.delta_weight())  # the merge adds exactly delta_weight()
