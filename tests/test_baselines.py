import pytest
import torch

from benchmarks.baselines import METHODS, gradient_fusion, input_grams, merge_deltas, residual_applied, ties
from blocklora.config import AdapterConfig
from blocklora.method.inject import eject, find_targets, inject


def test_ties_trims_elects_and_averages_agreeing_entries():
    a = torch.tensor([[3.0, -1.0, 0.1, 2.0]])
    b = torch.tensor([[1.0, 2.0, -0.1, -4.0]])
    out = ties([a, b], density=0.5)
    # top-2 of a: 3, 2; of b: 2, -4. Sign mass: +4, +2, 0, -2 -> elected +, +, 0, -
    assert torch.equal(out, torch.tensor([[3.0, 2.0, 0.0, -4.0]]))


def test_orthogonal_adaptation_a_is_orthogonal_across_slots(tiny_base):
    cfg = METHODS["orthogonal"].adapter_config(AdapterConfig(rank=2, num_slots=8))
    a = inject(tiny_base.pipe, cfg, slot=1)
    eject(tiny_base.pipe)
    b = inject(tiny_base.pipe, cfg, slot=6)
    eject(tiny_base.pipe)
    for key in a:
        assert not a[key].lora_A.requires_grad
        assert a[key].lora_B.shape[0] == a[key].base.out_features  # full rows: plain LoRA shape
        torch.testing.assert_close(a[key].lora_A @ b[key].lora_A.T, torch.zeros(2, 2), atol=1e-5, rtol=0)


def test_residual_applied_restores_the_base(tiny_base):
    from core_helpers import make_artifact

    cfg = METHODS["lora-mean"].adapter_config(AdapterConfig())
    arts = [make_artifact(tiny_base, cfg, f"c{i}", i, seed=i) for i in range(3)]
    targets = find_targets(tiny_base.pipe, cfg)
    w0 = {k: lin.weight.clone() for k, lin in targets.items()}
    res = merge_deltas(arts, "mean")
    with residual_applied(tiny_base, cfg, res, arts):
        k = next(iter(targets))
        torch.testing.assert_close(targets[k].weight, w0[k] + res[k])
    assert all(torch.equal(lin.weight, w0[k]) for k, lin in targets.items())


def test_gradient_fusion_keeps_each_concept_on_its_own_inputs():
    """Concepts whose inputs live in different subspaces are fused without loss: (W0 + dW) X_i =
    (W0 + dW_i) X_i for each i, where summing would add dW_j X_i and averaging would halve dW_i X_i."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q
    xs = [torch.randn(20, 4, generator=g) @ basis[:, :4].T, torch.randn(20, 4, generator=g) @ basis[:, 4:].T]
    deltas = [torch.randn(6, 8, generator=g) for _ in xs]
    fused = gradient_fusion(deltas, [x.T @ x for x in xs], ridge=1e-9)
    for x, d in zip(xs, deltas):
        torch.testing.assert_close(x @ fused.T, x @ d.T, atol=1e-4, rtol=1e-4)
    assert (xs[0] @ (deltas[0] + deltas[1]).T - xs[0] @ deltas[0].T).abs().max() > 0.1


def test_fusion_merge_uses_grams_from_the_real_unet(tiny_base):
    from core_helpers import make_artifact

    cfg = METHODS["mix-of-show"].adapter_config(AdapterConfig())
    arts = [make_artifact(tiny_base, cfg, f"c{i}", i, seed=i) for i in range(2)]
    latents, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([300, 700])
    grams = [input_grams(tiny_base, cfg, a, latents, t, [f"a photo of {' '.join(a.meta.triggers)} dog"] * 2)
             for a in arts]
    assert set(grams[0]) == set(arts[0].meta.layout)
    for key, c in grams[0].items():
        assert c.shape == (arts[0].meta.layout[key][1],) * 2 and torch.linalg.eigvalsh(c).min() > -1e-6 * c.abs().max()
    fused = merge_deltas(arts, "fusion", grams=grams)
    assert fused.keys() == grams[0].keys() and all(torch.isfinite(v).all() for v in fused.values())
    alone = merge_deltas(arts[:1], "fusion", grams=grams[:1])  # one concept, fused with nobody
    for key, d in alone.items():
        x = grams[0][key].float()
        torch.testing.assert_close(d @ x, arts[0].delta(key) @ x, atol=1e-3 * x.abs().max(), rtol=1e-3)
    with pytest.raises(ValueError, match="needs one input_grams"):
        merge_deltas(arts, "fusion")
    with pytest.raises(ValueError, match="unknown merge rule 'bogus'"):
        merge_deltas(arts, "bogus")
