#!/usr/bin/env bash
# Pretrain the toy base on a lent GPU inside a fixed time budget; bring its work dir back to export here.
#
#   bash jobs/toy/pretrain_base_gpu.sh OUT_DIR DENOISER_SECONDS      # on the GPU machine (device tool, carry .whl)
#   python jobs/toy/pretrain_base.py <the flags in OUT_DIR/command.txt> --work-dir WORK   # here, after unpacking
#
# A cosine schedule needs its length up front, so a 60-step probe measures the denoiser's step time
# first and the run gets the steps that fit DENOISER_SECONDS (a multiple of 800, so 8 sample grids).
# The work dir (weights, loss log, grids; not the optimizer moments) comes back as a gzipped tar cut
# into 15 MiB parts (the device tool returns files of at most 16 MiB). The export (card, samples,
# judge scores) runs on the CPU here: the card's sample grid must be what a CPU redraws (tests check).
# A dry run on a CPU checks the plumbing: DEVICE=cpu UNIT=8 VAE_STEPS=4 BATCH=4 bash ... /tmp/o 5
set -euo pipefail
device="${DEVICE:-cuda}" unit="${UNIT:-800}" vae_steps="${VAE_STEPS:-2000}" batch="${BATCH:-256}"  # the step is launch-bound on an H200: 0.11 s at batch 16 and at 64 alike
out="${1:?usage: bash jobs/toy/pretrain_base_gpu.sh OUT_DIR DENOISER_SECONDS}"
budget="${2:-300}"
source benchmarks/gpu/setup.sh
mkdir -p "$out"
work=$(mktemp -d) export_to=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/info.txt" || true
workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
common=(--device "$device" --data-workers "$workers" --batch "$batch" --vae-batch "$batch" --lr 1e-3 --seed 0)

step_s=$(python3 - "$workers" "$device" "$batch" <<'EOF'
"""60 timed denoiser steps (after 20 warm-up steps) of the run's configuration, on a throwaway work dir."""
import sys, tempfile, time
from pathlib import Path
import torch
from blocklora.toy.architecture import build_pipeline, build_text_encoder, build_unet, build_vae
from blocklora.toy.pretrain import Run, train_denoiser
work = Path(tempfile.mkdtemp())
workers, device, batch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
pipe = build_pipeline(build_vae(), build_unet(32), build_text_encoder()).to(device)
run = Run(work, device)
kw = dict(batch_size=batch, lr=1e-3, seed=0, every=10**6, sample_every=10**6, sample_steps=20, snr_gamma=5.0,
          workers=workers)
train_denoiser(run, pipe, steps=20, **kw)
sync(); t0 = time.perf_counter()
train_denoiser(run, pipe, steps=80, **kw)
sync()
print(f"{(time.perf_counter() - t0) / 60:.5f}")
EOF
)
steps=$(python3 -c "print(max($unit, int($budget / $step_s) // $unit * $unit))")
echo "probe: ${step_s} s/step at batch $batch -> ${steps} denoiser steps in ${budget} s" | tee -a "$out/info.txt"
flags=("${common[@]}" --steps "$steps" --vae-steps "$vae_steps" --checkpoint-every 400 --sample-every $((steps / 8)))
echo "${flags[*]}" > "$out/command.txt"
python3 jobs/toy/pretrain_base.py "${flags[@]}" --eval-seeds 1 --work-dir "$work" --out "$export_to" 2>&1 \
  | tr '\r' '\n' | grep -v '^\s*$' | awk 'NR % 200 == 1 || /exported|Error|error/' | tee "$out/pretrain.log"
tar -C "$work" --exclude 'opt_*' -czf "$work.tgz" .
split -b 15M -d "$work.tgz" "$out/work.tgz."
ls -la "$out"
