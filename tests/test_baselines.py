import torch

from blocklora.baselines import METHODS, merge_deltas, residual_applied, ties
from blocklora.config import AdapterConfig
from blocklora.inject import find_targets, inject, eject


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
