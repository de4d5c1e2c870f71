"""Stop a federation's coordinator for good (its state folder stays; start it again on it).

    python jobs/stop_coordinator.py [--address auto] [--namespace blocklora] [--name blocklora-coordinator]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a plain script

import ray  # noqa: E402

from federation import coordinator  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="auto")
    p.add_argument("--namespace", default=coordinator.DEFAULT_NAMESPACE)
    p.add_argument("--name", default=coordinator.DEFAULT_NAME)
    args = p.parse_args()
    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    ray.kill(coordinator.get(args.name, args.namespace), no_restart=True)
    print(f"coordinator {args.name!r} stopped")


if __name__ == "__main__":
    main()
