"""Invite a person to a federation (admin): prints the code they register their first client with.

    python jobs/invite.py --name alice [--quota 4] [--uses 1] [--admin-token-file ~/federation/admin_token] \
        [--address auto] [--namespace blocklora] [--coordinator blocklora-coordinator]

The person passes the code once, to their first client job (`client_train.py --invitation CODE`);
the job registers and keeps its own token in --token-file. `--uses N` lets N clients (machines)
register with the same code; whatever they hold counts against the person's one --quota. The code
is shown this once: the federation keeps only its digest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a plain script

import ray  # noqa: E402

from federation import coordinator  # noqa: E402
from federation.auth import new_invitation_code  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="the person's name, shown as the owner of their concepts")
    p.add_argument("--quota", type=int, default=None, help="live concepts + reservations the person may hold "
                                                           "(default: the federation's max_concepts_per_person)")
    p.add_argument("--uses", type=int, default=1, help="clients that may register with this code")
    p.add_argument("--admin-token-file", default="~/federation/admin_token", help="STATE_DIR/admin_token")
    p.add_argument("--address", default="auto")
    p.add_argument("--namespace", default=coordinator.DEFAULT_NAMESPACE)
    p.add_argument("--coordinator", default=coordinator.DEFAULT_NAME)
    args = p.parse_args()
    admin = Path(args.admin_token_file).expanduser().read_text().strip()
    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    code = new_invitation_code()
    done = ray.get(coordinator.get(args.coordinator, args.namespace).invite.remote(admin, args.name, code, args.quota,
                                                                                  args.uses))
    print(f"invited {done.name!r} (quota {done.quota}, {done.uses} client(s)); their code, shown this once:\n{code}")


if __name__ == "__main__":
    main()
