#!/usr/bin/env bash
# The GPU comparisons in one go (<= 8 min on one H100/H200). Usage: bash benchmarks/gpu/run.sh OUT_DIR
# benchmarks/gpu/setup.sh first makes the bare GPU image ready (carried wheels and tokenizer).
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu/run.sh OUT_DIR}"
source benchmarks/gpu/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out.gpu.txt" || true
python3 -m benchmarks.gpu_suite --device cuda --out "$out" 2>&1 | tee "$out.log" | grep -v '^{'
cat "$out/suite.md"
