import pytest
import torch
from torch import nn

from blocklora.config import AdapterConfig, TrainConfig
from blocklora.method.layer import BlockLoRALinear
from blocklora.pipeline.base import load_base
from blocklora.training.trainer import ConceptTrainer


def _layer(erasure=0.0, slot=2, seed=0, row_layout="block"):
    torch.manual_seed(seed)
    layer = BlockLoRALinear(nn.Linear(24, 40), rank=3, num_slots=8, slot=slot, erasure=erasure, row_layout=row_layout)
    nn.init.normal_(layer.lora_B)
    return layer


def test_owns_only_its_rows_and_cost_scales_with_them():
    layer = _layer()
    assert layer.lora_B.shape == (5, 3)  # 40 rows / 8 slots, not 40
    dw = layer.delta_weight()
    assert dw.shape == (40, 24)
    assert torch.count_nonzero(dw[:10]) == 0 and torch.count_nonzero(dw[15:]) == 0
    assert torch.count_nonzero(dw[10:15]) == 5 * 24


def test_strided_layout_owns_every_kth_row():
    layer = _layer(row_layout="strided")
    assert layer.lora_B.shape == (5, 3)
    nonzero = torch.nonzero(layer.delta_weight().abs().sum(1)).flatten().tolist()
    assert nonzero == [2, 10, 18, 26, 34]


@pytest.mark.parametrize("row_layout", ["block", "strided"])
def test_eval_forward_equals_base_plus_delta_weight(row_layout):
    layer = _layer(erasure=0.5, row_layout=row_layout).eval()
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


def test_strided_gradients_equal_the_dense_expressions():
    """Strided rows through the layer (widen's grouped padding): the gradients of A, B and x of
    x (W0 + (M ⊙ B) A)ᵀ written out densely with M over every 8th row."""
    layer = _layer(row_layout="strided").eval()
    x = torch.randn(3, 5, 24, requires_grad=True)
    grad_out = torch.randn(3, 5, 40)
    layer(x).backward(grad_out)
    got = layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), x.grad.clone()
    a, b = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    b_full = torch.zeros(40, 3).index_put((torch.arange(2, 40, 8),), b)
    (x2 @ (layer.base.weight + b_full @ a).T + layer.base.bias).backward(grad_out)
    for g, want in zip(got, (a.grad, b.grad, x2.grad)):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row_layout", ["block", "strided"])
def test_merge_matches_unmerged_and_unmerge_is_bit_exact(row_layout):
    layer = _layer(row_layout=row_layout).eval()
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


# -- the layer against the plain tensor expressions of its math -------------------------------------------

class _Reference(BlockLoRALinear):
    """The layer's forward written as the plain tensor expressions of its math (a 3-d matmul, the
    in-place `out[..., R] +=`), autograd recording every op: what the layer's own ops (2-d mm,
    `out + widen(res)`) must reproduce, forward and backward, to float32 rounding (`_close`)."""

    def forward(self, x):
        out = self.base(x)
        res = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T  # (..., |R|)
        if self.training and self.erasure > 0:
            shape = (res.shape[0],) + (1,) * (res.dim() - 2) + (res.shape[-1],)
            keep = torch.rand(shape, device=res.device) >= self.erasure
            res = res * keep.to(res.dtype)
        out[..., self.rows] += self.scale * res.to(out.dtype)
        return out


def _close(got: torch.Tensor, want: torch.Tensor, ulps: int = 32, what: str = "") -> None:
    """`got` equals `want` to `ulps` float32 units in the last place of `want`'s largest entry.

    The layer and the plain expressions form the same sums through different BLAS calls (a 2-d `mm`
    on the flattened tokens against a batched `matmul`, and the transposed products of their
    backwards). Which kernel a BLAS takes for a call, and so the order of its additions, depends on
    the CPU (MKL's AVX-512 and AMX paths round otherwise than its AVX2 one), so the two agree bit for
    bit only on some CPUs. What float arithmetic promises is a few units in the last place of the
    sums: here each side stays within 3 of the float64 result, and 32 leaves room for kernels that
    sum in other orders without letting a wrong row, mask or scale through (those are off by the
    size of a term, not of its rounding)."""
    atol = ulps * torch.finfo(torch.float32).eps * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def _pair(erasure, blockwise=True, frozen_a=False, scale=1.0):
    """The same layer twice, BlockLoRALinear and the reference, sharing one base and equal A and B."""
    torch.manual_seed(3)
    base = nn.Linear(24, 40)
    a = torch.randn(3, 24) if frozen_a else None
    layers = [cls(base, rank=3, num_slots=8, slot=5, erasure=erasure, blockwise=blockwise, frozen_a=a)
              for cls in (BlockLoRALinear, _Reference)]
    nn.init.normal_(layers[0].lora_B)
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    for layer in layers:
        layer.scale = scale
    return layers


def _run(layer, x, grad, seed):
    """Output and gradients (x, A, B) of one training forward/backward from a given RNG state."""
    layer.lora_A.grad = layer.lora_B.grad = None
    x = x.detach().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)  # the erasure mask's draws
    out = layer.train()(x)
    out.backward(grad)
    return [out, x.grad, layer.lora_A.grad, layer.lora_B.grad]


INPUTS = {  # name -> (input shape, whether x requires grad, transform)
    "tokens 3d": ((2, 7, 24), True, None),
    "flat 2d": ((9, 24), True, None),
    "image 4d": ((2, 3, 5, 24), True, None),
    "frozen input": ((2, 7, 24), False, None),
    "one token": ((1, 1, 24), True, None),
    "non-contiguous": ((7, 2, 24), True, lambda t: t.transpose(0, 1)),
}
LAYERS = {  # name -> _pair kwargs
    "erasure": dict(erasure=0.5),
    "no erasure": dict(erasure=0.0),
    "scaled": dict(erasure=0.3, scale=0.7),
    "plain lora rows": dict(erasure=0.2, blockwise=False),
    "frozen A": dict(erasure=0.2, frozen_a=True),
}


@pytest.mark.parametrize("layer_case", LAYERS)
@pytest.mark.parametrize("input_case", INPUTS)
def test_layer_matches_the_plain_expressions(layer_case, input_case):
    layer, ref = _pair(**LAYERS[layer_case])
    shape, requires_grad, transform = INPUTS[input_case]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g)
    x = (transform(x) if transform else x).requires_grad_(requires_grad)
    grad = torch.randn(layer.base(x).shape, generator=g)
    # the plain expressions fail on a frozen 3-d input when R is every row (an in-place update of
    # the whole output): there the reference runs on an input that requires grad, same numbers
    ref_x = x.detach().requires_grad_() if layer_case == "plain lora rows" and not requires_grad else x
    for seed in (0, 1):
        got, want = _run(layer, x, grad, seed), _run(ref, ref_x, grad, seed)
        if ref_x is not x:
            want[1] = None
        for name, a, b in zip(("out", "x.grad", "A.grad", "B.grad"), got, want):
            assert (a is None) == (b is None), name
            if a is not None:
                _close(a, b, what=f"{name} ({layer_case}, {input_case})")
    if LAYERS[layer_case].get("frozen_a"):
        assert layer.lora_A.grad is None


def test_shared_input_gradients_accumulate_alike():
    """One input feeding three layers (q, k, v of an attention) and an upstream parameter: the
    gradients it receives from the three sum to what the plain expressions give, to float32
    rounding (`_close`: the sums run through other BLAS calls, and float additions in other orders)."""
    def model(cls):
        torch.manual_seed(11)
        pre = nn.Linear(24, 24)
        qkv = [cls(nn.Linear(24, 40), rank=3, num_slots=8, slot=s, erasure=0.3) for s in (1, 4, 6)]
        for layer in qkv:
            nn.init.normal_(layer.lora_B)
        return pre, qkv

    grads = []
    for cls in (BlockLoRALinear, _Reference):
        pre, qkv = model(cls)
        torch.manual_seed(0)
        h = pre(torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(5)))
        q, k, v = (layer.train()(h) for layer in qkv)
        (q @ k.transpose(1, 2) @ v).square().mean().backward()
        grads.append([pre.weight.grad, pre.bias.grad] + [p.grad for layer in qkv for p in (layer.lora_A, layer.lora_B)])
    for a, b in zip(*grads):
        _close(a, b)


def test_training_steps_match_the_plain_expressions(monkeypatch):
    """Through the real trainer on the tiny UNet (inputs shared by q/k/v, erasure, AdamW): two steps
    with the layer's ops and two with the plain expressions leave the same adapter and trigger, to
    float32 rounding. AdamW divides each gradient by its own magnitude, so the first steps carry a
    gradient's rounding into the weights several times over: 128 units in the last place (a layer
    summed in float64 instead lands within 18)."""
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trained = []
    for forward in (BlockLoRALinear.forward, _Reference.forward):
        monkeypatch.setattr(BlockLoRALinear, "forward", forward)
        trainer = ConceptTrainer(load_base("tiny"), AdapterConfig(erasure=0.3), TrainConfig(resolution=32, seed=2),
                                 slot=3, name="pet", class_word="dog")
        losses = [trainer.step(images, [None]) for _ in range(2)]
        trained.append((losses, [p.detach().clone() for g in trainer.opt.param_groups for p in g["params"]]))
    (losses, params), (ref_losses, ref_params) = trained
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert len(params) == len(ref_params)
    for a, b in zip(params, ref_params):
        _close(a, b, ulps=128)
