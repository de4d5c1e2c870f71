"""Validate the toy identity judge and write its card, models/judge/README.md.

    python jobs/toy/validate_identity_judge.py          # a few CPU minutes: draws, and samples the toy base

Pair AUC (same concept vs different concept) on fresh drawn pictures of random identities and of the
benchmark's CONCEPTS, clean and degraded; the size and background readouts' accuracy; and the judge
on what the toy base draws for the concepts' class prompts (should score far below the concept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from blocklora.toy.identity import load_identity_judge, validate
from blocklora.toy.judge import JUDGE_DIR
from blocklora.toy.judge_card import write_card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=JUDGE_DIR, help="folder for README.md")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    judge = load_identity_judge()
    print(write_card(judge, validate(judge), " ".join(["python", *sys.argv]), args.out))


if __name__ == "__main__":
    main()
