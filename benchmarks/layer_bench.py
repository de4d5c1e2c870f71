"""One adapter layer's own cost: forward + backward through a chain of wrapped linears.

    python -m benchmarks.layer_bench                   # CPU: 32 layers, 320 wide, 16 and 4096 tokens
    python -m benchmarks.layer_bench --device cuda     # where an adapter's cost is its kernel launches
    python -m benchmarks.layer_bench --quick           # one round, few steps, 16 tokens

Why a chain and not the UNet: a training step at batch 1 on a GPU is the host dispatching a few
thousand small kernels (docs/results/training-cost.md), and one step's time then varies by more from one process
to the next (±15% on an H200's host) than adapters differ. Many wrapped layers in one process, the
arms alternating round by round, rank adapters by what each costs per layer. Arms: the plain frozen
`nn.Linear` (the floor), peft's LoRA (same rank, no dropout) and BlockLoRA (its slot's rows, erasure
on, as it trains). The input requires grad, as inside the UNet (the trigger embedding trains), so
every arm's backward also computes the input's gradient. `adapter_cost_ratio` is BlockLoRA's cost
above the plain linear over peft's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from benchmarks.common import DTYPES, add_device_args, emit, environment, timed
from blocklora.config import AdapterConfig, add_flags, from_args
from blocklora.method.layer import BlockLoRALinear

ARMS = ("linear", "peft-lora", "blocklora")


def chain(arm: str, layers: int, width: int, adapter: AdapterConfig, device: str, dtype: torch.dtype) -> nn.Module:
    """`layers` frozen width x width linears in a row, wrapped as `arm` wraps them, in training mode."""
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(width, width) for _ in range(layers)]
    if arm == "blocklora":
        mods = [BlockLoRALinear(m, adapter.rank, adapter.num_slots, slot=1, erasure=adapter.erasure) for m in mods]
    seq = nn.Sequential(*mods)
    if arm == "peft-lora":
        config = LoraConfig(r=adapter.rank, lora_alpha=adapter.rank, target_modules=[str(i) for i in range(layers)])
        seq = inject_adapter_in_model(config, seq)
    for name, p in seq.named_parameters():
        p.requires_grad_("lora_" in name)
    return seq.to(device, dtype).train()


def kernels_per_layer(seq: nn.Module, x: torch.Tensor, layers: int) -> float | None:
    """GPU kernels one forward + backward launches, per layer (None on a CPU)."""
    if x.device.type != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        seq(x).sum().backward()
        torch.cuda.synchronize(x.device)
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / layers


def run(layers: int, width: int, tokens: list[int], rounds: int, steps: int, adapter: AdapterConfig,
        device: str, dtype: torch.dtype) -> dict:
    rows = []
    for n in tokens:
        x0 = torch.randn(1, n, width, device=device, dtype=dtype)
        per_round: dict[str, list[float]] = {arm: [] for arm in ARMS}
        kernels = {}
        for i in range(rounds):
            for arm in ARMS[i % len(ARMS):] + ARMS[:i % len(ARMS)]:  # each arm leads in turn
                seq = chain(arm, layers, width, adapter, device, dtype)
                step = lambda: seq(x0.detach().requires_grad_()).sum().backward()  # noqa: E731
                for _ in range(3):
                    step()
                times = [timed(step, device) for _ in range(steps)]
                per_round[arm].append(statistics.median(times) / layers * 1e6)
                kernels[arm] = kernels_per_layer(seq, x0.detach().requires_grad_(), layers)
        us = {arm: statistics.median(v) for arm, v in per_round.items()}
        rows.append({
            "tokens": n, "us_per_layer": us, "round_us_per_layer": per_round, "kernels_per_layer": kernels,
            "blocklora_vs_peft": us["blocklora"] / us["peft-lora"],
            "adapter_cost_ratio": (us["blocklora"] - us["linear"]) / (us["peft-lora"] - us["linear"]),
        })
        print(f"{n} tokens: " + ", ".join(f"{a} {us[a]:.1f} µs" for a in ARMS)
              + f" per layer; BlockLoRA / peft {rows[-1]['blocklora_vs_peft']:.3f}, "
              f"adapter cost {rows[-1]['adapter_cost_ratio']:.3f}", flush=True)
    return {"benchmark": "layer", "env": environment(device, dtype), "layers": layers, "width": width,
            "rank": adapter.rank, "slots": adapter.num_slots, "erasure": adapter.erasure, "rounds": rounds,
            "steps": steps, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round, 10 timed steps, 16 tokens")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--width", type=int, default=320, help="in and out features of every linear (SD1.5's first blocks)")
    p.add_argument("--tokens", type=int, nargs="+", help="tokens per input (default: 16 4096; --quick 16)")
    p.add_argument("--rounds", type=int, help="times the arms alternate (default: 3, --quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--out", type=Path, help="also write the JSON to OUT/layer.json")
    add_device_args(p)
    add_flags(p, AdapterConfig, only=("rank", "num_slots", "erasure"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    adapter = from_args(AdapterConfig, args, p)
    tokens = args.tokens or ([16] if args.quick else [16, 4096])
    rounds = args.rounds or (1 if args.quick else 3)
    result = run(args.layers, args.width, tokens, rounds, 10 if args.quick else 40, adapter,
                 args.device, DTYPES[args.dtype])
    result["quick"] = args.quick
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "layer.json").write_text(json.dumps(result, indent=1))
    emit(result)


if __name__ == "__main__":
    main()
