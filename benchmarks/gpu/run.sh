#!/usr/bin/env bash
# The GPU comparisons in one go (<= 8 min on one H100/H200). Usage: bash benchmarks/gpu/run.sh OUT_DIR
# Installs the carried wheels (.whl: diffusers and importlib_metadata, absent from the GPU image) first.
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu/run.sh OUT_DIR}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out.gpu.txt" || true
python3 -m benchmarks.gpu_suite --device cuda --out "$out" 2>&1 | tee "$out.log" | grep -v '^{'
cat "$out/suite.md"
