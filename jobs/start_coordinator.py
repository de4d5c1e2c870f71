"""Start a federation's coordinator: a detached, named Ray actor that outlives this script.

    python jobs/start_coordinator.py --base-model tiny --slots 16 --rank 4 --state-dir ~/federation \
        [--address auto] [--namespace blocklora] [--name blocklora-coordinator] [--dtype float32]

The admin token comes from BLOCKLORA_ADMIN_TOKEN or is generated and written to
STATE_DIR/admin_token (mode 0600); it is never printed. On a state folder that already holds a
federation, the stored admin token and every concept are kept, and the other flags must match it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a plain script
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402

from blocklora.config import AdapterConfig, FederationConfig, PrecisionConfig, add_flags, from_args  # noqa: E402
from blocklora.files.atomic import atomic_write  # noqa: E402
from federation import coordinator  # noqa: E402
from federation.auth import new_token, token_hash  # noqa: E402
from federation.store import DATABASE, MANIFEST  # noqa: E402


def new_admin_token(state_dir: Path) -> str | None:
    """A new federation's admin token (None: the state folder already holds a federation, whose
    token stays). Held in memory until the coordinator is up, so a failed start leaves no file."""
    if (state_dir / DATABASE).exists() or (state_dir / MANIFEST).exists():
        print("existing federation state found: its admin token stays valid")
        return None
    return os.environ.get("BLOCKLORA_ADMIN_TOKEN") or new_token()


def keep_admin_token(state_dir: Path, token: str) -> None:
    """Written once the coordinator runs with its hash: the only copy a generated token has."""
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(state_dir / "admin_token", token.encode(), 0o600)
    print(f"admin token written to {state_dir / 'admin_token'} (mode 0600)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", required=True, help="folder on this node that holds the federation's state")
    p.add_argument("--max-artifact-mb", type=float, default=FederationConfig.max_artifact_bytes / 2**20,
                   help="submissions above this many MiB are refused before parsing")
    p.add_argument("--max-restarts", type=int, default=-1, help="-1: restart the actor forever")
    p.add_argument("--address", default="auto")
    p.add_argument("--namespace", default=coordinator.DEFAULT_NAMESPACE)
    p.add_argument("--name", default=coordinator.DEFAULT_NAME)
    add_flags(p, FederationConfig, skip=("max_artifact_bytes",))
    add_flags(p, AdapterConfig, skip=("blockwise", "freeze_a"))  # ablations: a federation is always blockwise
    add_flags(p, PrecisionConfig)
    args = p.parse_args()

    adapter = from_args(AdapterConfig, args, p)
    config = from_args(FederationConfig, args, p, max_artifact_bytes=int(args.max_artifact_mb * 2**20))
    state_dir = Path(args.state_dir).expanduser().resolve()
    token = new_admin_token(state_dir)
    coordinator.connect(args.address, args.namespace)
    actor = coordinator.start(state_dir, adapter, config, token and token_hash(token), args.name,
                              args.namespace, args.max_restarts, dtype=from_args(PrecisionConfig, args, p).dtype)
    if token:
        keep_admin_token(state_dir, token)
    info = ray.get(actor.info.remote())
    print(f"coordinator {args.name!r} (namespace {args.namespace!r}) is up: base {info.base_spec} "
          f"{info.base_fingerprint[:12]}…, {info.num_slots} slots, {info.live} live concept(s), "
          f"version {info.version}, state in {state_dir}")


if __name__ == "__main__":
    main()
