"""Train the toy judge (shape + colour of the main object) and write models/judge/judge.safetensors.

    python jobs/toy/train_judge.py --steps 1500 --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from blocklora.toy.judge import JUDGE_DIR, markdown, save_judge, score_data, train_judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=32, help="pictures per step")
    ap.add_argument("--seed", type=int, default=1000, help="weights and data stream")
    ap.add_argument("--out", type=Path, default=JUDGE_DIR, help="folder for judge.safetensors")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    judge = train_judge(args.steps, args.batch, seed=args.seed)
    print(f"saved {save_judge(judge, args.out)}")
    print(markdown(score_data(judge)))


if __name__ == "__main__":
    main()
