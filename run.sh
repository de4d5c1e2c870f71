#!/usr/bin/env bash
# One entry point for people and CI: sets up .venv on first use, then runs what you ask for.
#   bash run.sh main [args]   the main job on the embedded default (see README)
#   bash run.sh test [args]   the whole test suite (what CI runs)
#   bash run.sh py ARGS       python inside the project's environment
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1

venv=.venv
stamp=$venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "== setting up $venv (first run: installs torch, diffusers, ray; a few minutes) =="
  python3 -m venv "$venv"
  log=$venv/install.log
  { "$venv/bin/pip" install --upgrade pip &&
    "$venv/bin/pip" install torch torchvision &&   # pip takes the local wheels where the machine has them
    "$venv/bin/pip" install -e ".[dev]"; } > "$log" 2>&1 || { tail -40 "$log"; echo "install failed: see $log" >&2; exit 1; }
  rm -f "$venv"/.installed-* && touch "$stamp"
fi
export PATH="$PWD/$venv/bin:$PATH"

cmd=${1:-}; shift || true
case "$cmd" in
  main) exec python jobs/main.py "$@" ;;
  test) rc=0; python -m pytest -q -p no:cacheprovider --durations=15 "$@" || rc=$?
        [ $rc -eq 5 ] && { echo "no tests ran"; exit 1; }; exit $rc ;;
  py) exec python "$@" ;;
  *) echo "usage: bash run.sh {main|test|py} [args]" >&2; exit 2 ;;
esac
