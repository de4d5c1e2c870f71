"""Single-process quickstart (no Ray): train one bundled example concept, merge it, generate.

    python jobs/local_demo.py --concept chelsea --out outputs/local [--steps 600] [--guidance 4]

Training and sampling start from the settings measured on the pretrained toy base (blocklora/toy/recipe.py:
TOY_BASE_TRAIN / TOY_BASE_GENERATE); every TrainConfig and AdapterConfig field has a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocklora.config import AdapterConfig, GenerateConfig, TrainConfig, add_flags, from_args  # noqa: E402
from blocklora.method.merge import LiveMerge  # noqa: E402
from blocklora.pipeline.base import load_base  # noqa: E402
from blocklora.pipeline.generate import contact_sheet, generate  # noqa: E402
from blocklora.pipeline.precision import base_dtype  # noqa: E402
from blocklora.pipeline.prompts import expand  # noqa: E402
from blocklora.toy.recipe import (  # noqa: E402
    TOY_BASE_ADAPTER,
    TOY_BASE_GENERATE,
    TOY_BASE_TRAIN,
    default_base_spec,  # noqa: E402
)
from blocklora.training.data import image_files  # noqa: E402
from blocklora.training.trainer import train_concept  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "concepts"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=default_base_spec(), help="default: the toy base if present, else 'tiny'")
    ap.add_argument("--concept", default="chelsea", help=f"a folder under {EXAMPLES}")
    ap.add_argument("--slot", type=int, default=0, help="which row block the concept owns")
    ap.add_argument("--out", default="outputs/local")
    add_flags(ap, TrainConfig, TOY_BASE_TRAIN, skip=("resolution",))  # trains at the base's resolution
    add_flags(ap, AdapterConfig, TOY_BASE_ADAPTER)
    add_flags(ap, GenerateConfig, TOY_BASE_GENERATE, only=("guidance_scale",))
    args = ap.parse_args()
    adapter = from_args(AdapterConfig, args, ap)

    folder = EXAMPLES / args.concept
    info = json.loads((folder / "concept.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train = from_args(TrainConfig, args, ap)
    base = load_base(args.base, dtype=base_dtype(train.mixed_precision))  # generates in that dtype too
    print(f"[1/3] base {args.base} loaded (fingerprint {base.fingerprint[:12]}…, {base.resolution}px, "
          f"{base.pipe.unet.dtype})")
    art = train_concept(base, folder, info["name"], info["class_word"], args.slot, adapter,
                        dataclasses.replace(train, resolution=base.resolution))
    path = art.save(out / f"{art.name}.safetensors")
    print(f"[2/3] trained {art.name!r} in slot {art.meta.slot}: {path} ({path.stat().st_size:,} bytes)")

    cfg = from_args(GenerateConfig, args, ap, width=base.resolution, height=base.resolution)
    prompt = f"a photo of {{{art.name}}}"
    before = generate(base, f"a photo of {info['class_word']}", cfg, 4)
    lm = LiveMerge(base, adapter)
    lm.add(art)
    after = generate(base, expand(prompt, lm.phrases()), cfg, 4)
    shown = [Image.open(f).convert("RGB") for f in image_files(folder)[:4]]
    sheet = contact_sheet([(f"training images of {art.name}", shown),
                           (f"base: a photo of {info['class_word']}", before), (f"merged: {prompt}", after)])
    sheet.save(out / "contact_sheet.png")
    print(f"[3/3] wrote {out / 'contact_sheet.png'} in {time.time() - t0:.0f} s total")


if __name__ == "__main__":
    main()
