# Sourced by the GPU-machine scripts (benchmarks/gpu/run.sh, jobs/toy/pretrain_base_gpu.sh): make the bare
# GPU image able to run the project. It lacks diffusers (carried as wheels in .whl) and open_clip, whose
# BPE file the CLIP tokenizer is built from: carry the built tokenizer instead (.whl/clip-tokenizer, a copy
# of ~/.cache/blocklora/clip-tokenizer from a machine that ran the project once). See benchmarks/gpu/README.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
if [ -f .whl/clip-tokenizer/vocab.json ]; then
  mkdir -p ~/.cache/blocklora && cp -r .whl/clip-tokenizer ~/.cache/blocklora/
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
