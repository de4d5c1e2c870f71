"""Pretrain the toy base (VAE, then UNet + CLIP text encoder) on blocklora.toy.data, on a CPU.

The one way to make models/toy-base: blocklora.toy.pretrain trains (resumable from --work-dir; re-running
a finished run only re-exports), blocklora.toy.card exports the diffusers folder with its model card.

    python jobs/toy/pretrain_base.py --work-dir /tmp/toy-base-work
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, when run as a plain script

import torch  # noqa: E402

from blocklora.config import PretrainConfig, add_flags, from_args  # noqa: E402
from blocklora.toy.base import TOY_BASE_DIR  # noqa: E402
from blocklora.toy.card import export  # noqa: E402
from blocklora.toy.pretrain import pretrain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=TOY_BASE_DIR, help="diffusers folder to export to")
    ap.add_argument("--work-dir", type=Path, default=Path("work/toy-base"), help="checkpoints and logs")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="an exported toy base (e.g. models/toy-base) to train on from, in a new --work-dir: its VAE "
                         "and latent scale are kept, --steps more denoiser steps on the stream of --seed")
    add_flags(ap, PretrainConfig)
    args = ap.parse_args()
    cfg = from_args(PretrainConfig, args, ap)

    torch.set_num_threads(cfg.threads)
    pipe, run, scale = pretrain(cfg, args.work_dir, args.init_from)
    export(args.out, pipe, cfg, run, scale)
    print(f"exported to {args.out} ({run.state['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
