"""Train one concept for a federation and upload it; meant to run as a Ray job on the client's node.

    ray job submit --working-dir . -- python jobs/client_train.py --images /data/my-dog \
        --class-word dog --name my-dog [--with her-cat our-sofa] [--steps 200] [--workers 1] [--use-gpu] \
        [--mixed-precision bf16] [--token-file PATH] [--invitation CODE]

--images is a folder on the node the job runs on. The client token is kept in --token-file
(created with mode 0600 on first use, with the admin's --invitation code; reused afterwards).
--with names concepts this one must be mergeable with (its slot is chosen apart from theirs).
Prints the slot, the concepts it cannot be merged with, the trigger and the new version.
"""

from __future__ import annotations

import time

T_START = time.time()  # before the imports: the job's phase marks count them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a plain script
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# submitted with --entrypoint-resources (e.g. client_node on a cluster.yaml cluster), the job inherits
# its supervisor's env_vars (RAY_worker_niceness), and Ray refuses ray.init's own env_vars for
# repeating a key unless told to let the driver's values win
os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")

import ray  # noqa: E402

from blocklora.config import TrainConfig, add_flags, from_args  # noqa: E402
from devtools.job_profile import MARKS_LINE  # noqa: E402
from federation import coordinator  # noqa: E402
from federation.client import DEFAULT_STORAGE, job_init_args, load_or_register, train_and_submit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder of the concept's pictures (on this node)")
    p.add_argument("--class-word", required=True, help="what the concept is, e.g. 'dog'")
    p.add_argument("--name", required=True, help="the concept's name in the federation")
    add_flags(p, TrainConfig, skip=("resolution",))  # clients train at the resolution the grant names
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (data parallel)")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--token-file", default="~/.blocklora/client_token")
    p.add_argument("--invitation", default=None, help="the code the federation's admin gave you (jobs/invite.py): "
                                                      "needed once, to register; the token file is reused after")
    p.add_argument("--with", dest="with_", nargs="+", default=[], metavar="NAME",
                   help="live or reserved concepts this one must be mergeable with: its slot is chosen apart "
                        "from theirs")
    p.add_argument("--storage-path", default=DEFAULT_STORAGE, help="checkpoints (on this node)")
    p.add_argument("--address", default="auto")
    p.add_argument("--namespace", default=coordinator.DEFAULT_NAMESPACE)
    p.add_argument("--coordinator", default=coordinator.DEFAULT_NAME)
    p.add_argument("--verbose", action="store_true", help="also show Ray's own output (Ray Data, Ray Train logs)")
    args = p.parse_args()

    train = from_args(TrainConfig, args, p)
    marks = {"t_driver_start": T_START, "t_imported": time.time()}
    ray.init(address=args.address, namespace=args.namespace, **job_init_args(args.verbose))
    marks["t_connected"] = time.time()
    coord = coordinator.get(args.coordinator, args.namespace)
    token = load_or_register(coord, args.token_file, args.invitation)
    live = train_and_submit(coord, token, args.images, args.name, args.class_word, train, args.workers,
                            args.use_gpu, args.storage_path, marks, args.verbose, tuple(args.with_),
                            report_to=(args.coordinator, args.namespace))
    print(f"concept {live.name!r} is live in slot {live.slot}: prompt with "
          f"'{' '.join(live.triggers)} {live.class_word}'; federation version {live.version}")
    marks["t_driver_end"] = time.time()
    print(MARKS_LINE + json.dumps(marks), flush=True)


if __name__ == "__main__":
    main()
