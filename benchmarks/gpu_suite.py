"""The GPU comparisons in one run (≤ 8 minutes on one H100/H200): JSON per part + a markdown table.

    python -m benchmarks.gpu_suite --device cuda --out gpu-results        # on the GPU machine
    python -m benchmarks.gpu_suite --quick --device cpu --parts e2e --out /tmp/s   # structure only

Each part is one of the project's benchmarks run as its own process (a crash or a timeout in one
leaves the others' figures), with the same --device and its own --dtype:
- layer_fp32: one adapter layer's own cost, forward + backward, over 32 chained 320x320 linears:
  plain linear, peft LoRA, BlockLoRA (layer_bench; how the layer was chosen, docs/results/training-cost.md);
- train_fp32 / train_bf16: one client step, BlockLoRA vs peft LoRA, at SD1.5 shapes (train_bench;
  train_bf16 is bf16 mixed precision: the base in bf16, both arms' adapters and AdamW state in
  float32, the step under autocast);
- mixed_bf16: float32 vs bf16-mixed training of one concept, same seed, 60 steps at SD1.5 shapes:
  the final loss of each (#14: within 2%) and the step times (mixed_precision);
- merge_fp16: LiveMerge add/remove at N = 1 and 15 vs diffusers' unfuse -> load -> set_adapters -> fuse;
- serve_fp16 / serve_fp32: 8 requests with CFG, 16 live, each request its own pair: base, fused,
  mixed (blocklora.method.residual) and peft per request (serve_bench at latent 64);
- e2e_fp16: images/s of the whole pipeline (text encoder, 20 UNet steps, VAE) with 15 merged concepts.
Everything is written under --out: `<part>.json`, `suite.json` (all parts) and `suite.md` (the table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import DTYPES, emit, environment, random_artifact, sd15_base, sync
from blocklora.config import AdapterConfig
from blocklora.method.inject import layout
from blocklora.method.merge import LiveMerge
from blocklora.pipeline.base import Base, load_base

ROOT = Path(__file__).resolve().parents[1]
# part -> (benchmark module, its arguments beside --device/--dtype, dtype)
PARTS: dict[str, tuple[str, list[str], str]] = {
    "layer_fp32": ("layer_bench", [], "float32"),
    "train_fp32": ("train_bench", [], "float32"),
    "train_bf16": ("train_bench", [], "float32"),  # the base's dtype comes from MODES
    "mixed_bf16": ("mixed_precision", [], "bfloat16"),
    "merge_fp16": ("merge_bench", ["--ranks", "4", "--ns", "1", "15", "--diffusers-cycles", "4"], "float16"),
    "serve_fp16": ("serve_bench", ["--batch", "8", "--latent", "64"], "float16"),
    "serve_fp32": ("serve_bench", ["--batch", "8", "--latent", "64"], "float32"),
    "e2e_fp16": ("", [], "float16"),  # in this process: end_to_end()
}
# what a part measures, kept under --quick too (PARTS' arguments are sizes, which --quick replaces)
MODES: dict[str, list[str]] = {"train_bf16": ["--mixed-precision", "bf16"]}


def run_part(name: str, device: str, quick: bool, out: Path, timeout: float) -> dict:
    """One benchmark as a child process; its last stdout line is its JSON."""
    module, extra, dtype = PARTS[name]
    if quick:
        extra = []  # each benchmark's own --quick sizes
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--device", device, "--dtype", dtype,
           "--out", str(out / name), *MODES.get(name, []), *extra, *(["--quick"] if quick else [])]
    if module == "serve_bench":
        cmd.remove("--out"), cmd.remove(str(out / name))  # it writes no files
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"part": name, "error": f"timed out after {timeout:.0f} s", "cmd": cmd}
    if proc.returncode != 0:
        return {"part": name, "error": proc.stderr[-2000:], "cmd": cmd}
    return {"part": name, "wall_s": time.perf_counter() - t0, "cmd": cmd,
            "result": json.loads(proc.stdout.strip().splitlines()[-1])}


@torch.no_grad()
def end_to_end(device: str, dtype: torch.dtype, quick: bool) -> dict:
    """Images per second of the full pipeline with 15 concepts merged (4 prompts, 20 steps, CFG)."""
    base: Base = load_base("tiny", device=device, dtype=dtype) if quick else sd15_base(device=device, dtype=dtype)
    adapter = AdapterConfig(rank=4, num_slots=16)
    lay = layout(base.pipe, adapter)
    live = LiveMerge(base, adapter)
    live.set([random_artifact(base, adapter, lay, k, seed=k) for k in range(15)])
    prompts, steps = ["a photo of <blk3> dog"] * 4, (2 if quick else 20)
    side = (8 if quick else 64) * base.pipe.vae_scale_factor

    def call() -> None:
        base.pipe(prompts, num_inference_steps=steps, height=side, width=side, guidance_scale=5.0,
                  generator=torch.Generator(device).manual_seed(0))

    call()  # warm-up: kernels, allocator
    times = []
    for _ in range(1 if quick else 3):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"part": "e2e_fp16", "result": {"env": environment(device, dtype), "prompts": len(prompts),
                                           "steps": steps, "pixels": side, "merged": 15, "call_s": best,
                                           "images_per_s": len(prompts) / best, "quick": quick}}


def table(parts: list[dict]) -> str:
    """The figures a reader compares, one line per part (absolute numbers beside each ratio)."""
    lines = ["| part | what | figures |", "| --- | --- | --- |"]
    for p in parts:
        name, r = p["part"], p.get("result")
        if r is None:
            error = p["error"].strip()
            lines.append(f"| {name} | failed | {error.splitlines()[-1][:120] if error else '?'} |")
            continue
        if name.startswith("mixed"):
            plain, mixed = r["arms"]["no"], r["arms"][r["mixed_precision"]]
            lines.append(f"| {name} | {r['steps']} steps, {r['model']}, float32 vs {r['mixed_precision']} mixed "
                         f"| final loss {plain['final_loss']:.4f} vs {mixed['final_loss']:.4f} "
                         f"({r['loss_ratio']:.4f}x, target within {r['target']:.0%}); step "
                         f"{plain['step_s_median'] * 1e3:.1f} vs {mixed['step_s_median'] * 1e3:.1f} ms "
                         f"({r['step_time_ratio']:.2f}x) |")
        elif name.startswith("layer"):
            cells = "; ".join(
                f"{x['tokens']} tokens: linear {x['us_per_layer']['linear']:.0f}, "
                f"peft {x['us_per_layer']['peft-lora']:.0f}, BlockLoRA {x['us_per_layer']['blocklora']:.0f} µs "
                f"({x['blocklora_vs_peft']:.2f}x peft; adapter cost {x['adapter_cost_ratio']:.2f}x)" for x in r["rows"])
            lines.append(f"| {name} | fwd + bwd per layer, {r['layers']} chained {r['width']}x{r['width']} linears "
                         f"| {cells} |")
        elif name.startswith("train"):
            rows = {(x["model"], x["arm"]): x for x in r["rows"]}
            ours, peft = rows["sd15-shaped", "blocklora"], rows["sd15-shaped", "peft-lora"]
            mixed = "" if r.get("mixed_precision", "no") == "no" else f", {r['mixed_precision']} mixed precision"
            lines.append(f"| {name} | step, SD1.5 shapes, batch {ours['batch']}{mixed} "
                         f"| BlockLoRA {ours['step_s_median'] * 1e3:.1f} ms "
                         f"vs peft {peft['step_s_median'] * 1e3:.1f} ms "
                         f"({r['summary']['sd15-shaped']['step_time_ratio']:.2f}x) |")
        elif name.startswith("merge"):
            n = max(r["N"])
            rows = {(x["method"], x["N"]): x for x in r["rows"]}
            ours, theirs = rows["blocklora", n], rows["diffusers-peft", n]
            ex = r["exactness"]["r4"]["blocklora"]  # vs-dense compares with a CPU BLAS reference: not bitwise on a GPU
            lines.append(f"| {name} | add / remove at N = {n} "
                         f"| ours {ours['add_s'] * 1e3:.2f} / {ours['remove_s'] * 1e3:.2f} ms, "
                         f"diffusers {theirs['add_s'] * 1e3:.0f} / {theirs['remove_s'] * 1e3:.0f} ms; "
                         f"restore and cycled-vs-fresh max abs diff {ex['restore_max_abs_diff']:g} / "
                         f"{ex['max_abs_diff_vs_fresh']:g} |")
        elif name.startswith("serve"):
            s = r["runs"][-1]
            ms = s["step_ms"]
            lines.append(f"| {name} | UNet step, {s['batch']} requests (batch {s['unet_batch']}), "
                         f"latent {s['latent']} | base {ms['a_base']} ms, fused {ms['b_fused']} ms, "
                         f"mixed {ms['c_mixed']} ms "
                         f"({s['c_over_b']}x fused; union kernel {ms.get('c_union', '-')} ms), "
                         f"peft per request {ms['d_peft']} ms |")
        else:
            lines.append(f"| {name} | {r['prompts']} prompts x {r['steps']} steps, {r['pixels']} px, "
                         f"{r['merged']} merged | {r['call_s']:.2f} s per call, {r['images_per_s']:.2f} images/s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device: cuda, cuda:1, or cpu for a structure check")
    p.add_argument("--out", type=Path, required=True, help="folder for <part>.json, suite.json and suite.md")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="which parts to run")
    p.add_argument("--quick", action="store_true", help="every part at its --quick size (for CPU checks)")
    p.add_argument("--part-timeout", type=float, default=70.0,
                   help="seconds before a part is given up (parts take 10-40 s on an H200; the cap keeps a "
                        "stuck one from eating the lease)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = []
    for name in args.parts:
        t0 = time.perf_counter()
        part = (end_to_end(args.device, DTYPES[PARTS[name][2]], args.quick) if name == "e2e_fp16"
                else run_part(name, args.device, args.quick, args.out, args.part_timeout))
        print(f"{name}: {'ok' if 'result' in part else 'FAILED'} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        (args.out / f"{name}.json").write_text(json.dumps(part, indent=1, default=float))
        parts.append(part)
    env = environment(args.device, torch.float32)
    (args.out / "suite.md").write_text(f"# GPU suite on {env['device_name'] or args.device}\n\n" + table(parts))
    suite = {"benchmark": "gpu_suite", "quick": args.quick, "env": env, "parts": parts}
    (args.out / "suite.json").write_text(json.dumps(suite, indent=1, default=float))
    emit(suite)


if __name__ == "__main__":
    main()
