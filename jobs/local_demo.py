"""Single-process quickstart (no Ray): train one bundled example concept, merge it, generate.

    python jobs/local_demo.py --concept chelsea --steps 150 --out outputs/local
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blocklora.base import default_base_spec, load_base  # noqa: E402
from blocklora.config import AdapterConfig, GenerateConfig, TrainConfig  # noqa: E402
from blocklora.data import image_files  # noqa: E402
from blocklora.generate import contact_sheet, generate  # noqa: E402
from blocklora.merge import LiveMerge  # noqa: E402
from blocklora.prompts import expand  # noqa: E402
from blocklora.trainer import train_concept  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "concepts"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=default_base_spec(), help="default: the toy base if present, else 'tiny'")
    ap.add_argument("--concept", default="chelsea", help=f"a folder under {EXAMPLES}")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr, help="learning rate of A and the owned rows of B")
    ap.add_argument("--token-lr", type=float, default=TrainConfig.token_lr, help="learning rate of the trigger embedding")
    ap.add_argument("--guidance", type=float, default=GenerateConfig.guidance_scale, help="classifier-free guidance scale")
    ap.add_argument("--slot", type=int, default=0)
    ap.add_argument("--out", default="outputs/local")
    args = ap.parse_args()

    folder = EXAMPLES / args.concept
    info = json.loads((folder / "concept.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = load_base(args.base)
    print(f"[1/3] base {args.base} loaded (fingerprint {base.fingerprint[:12]}…, {base.resolution}px)")
    adapter = AdapterConfig()
    art = train_concept(base, folder, info["name"], info["class_word"], args.slot, adapter,
                        TrainConfig(steps=args.steps, lr=args.lr, token_lr=args.token_lr, resolution=base.resolution))
    path = art.save(out / f"{art.name}.safetensors")
    print(f"[2/3] trained {art.name!r} in slot {art.meta.slot}: {path} ({path.stat().st_size:,} bytes)")

    cfg = GenerateConfig(width=base.resolution, height=base.resolution, guidance_scale=args.guidance)
    prompt = f"a photo of {{{art.name}}}"
    before = generate(base, f"a photo of {info['class_word']}", cfg, 4)
    lm = LiveMerge(base, adapter)
    lm.add(art)
    after = generate(base, expand(prompt, lm.phrases()), cfg, 4)
    shown = [Image.open(f).convert("RGB") for f in image_files(folder)[:4]]
    sheet = contact_sheet([(f"training images of {art.name}", shown), (f"base: a photo of {info['class_word']}", before),
                           (f"merged: {prompt}", after)])
    sheet.save(out / "contact_sheet.png")
    print(f"[3/3] wrote {out / 'contact_sheet.png'} in {time.time() - t0:.0f} s total")


if __name__ == "__main__":
    main()
