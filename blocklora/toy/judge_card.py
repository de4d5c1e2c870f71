"""The identity judge's model card: validation on drawn pictures and a check on generated ones.

The generated check asks the toy base for each benchmark concept's class prompt ("a large star on
a green background"): the base has never seen the concept, so those pictures must score far below a
held-out drawn picture of the concept, while their backgrounds still match the prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blocklora.toy.base import GUIDANCE, SAMPLE_STEPS, TOY_BASE_DIR, draw
from blocklora.toy.concepts import CONCEPTS, class_prompt, eval_attributes, heldout_picture, reference_pictures
from blocklora.toy.identity import Check, IdentityJudge

REFERENCES, SEEDS = 8, (0, 1)


def generated_check(judge: IdentityJudge) -> dict[str, float]:
    """Mean image and shape alignment (to 8 reference pictures) of: each concept's held-out drawn picture,
    the other concepts' held-out pictures, and the base's class-prompt pictures; plus their text alignment."""
    from blocklora.pipeline.base import load_base

    pipe = load_base(str(TOY_BASE_DIR)).pipe
    pipe.set_progress_bar_config(disable=True)
    own, other, base, text = [], [], [], []
    shape_own, shape_other, shape_base = [], [], []
    held = [heldout_picture(c) for c in CONCEPTS]
    for i, c in enumerate(CONCEPTS):
        refs = reference_pictures(c, REFERENCES, seed=0)
        own.append(float(judge.image_alignment([held[i]], refs)[0]))
        other.append(float(judge.image_alignment([h for j, h in enumerate(held) if j != i], refs).mean()))
        attrs = eval_attributes(c, 1)[0]
        pictures = draw(pipe, [(class_prompt(c, attrs), s) for s in SEEDS])
        base.append(float(judge.image_alignment(pictures, refs).mean()))
        text.append(float(judge.text_alignment(pictures, attrs).mean()))
        shape_own.append(float(judge.shape_alignment([held[i]], refs)[0]))
        shape_other.append(float(judge.shape_alignment([h for j, h in enumerate(held) if j != i], refs).mean()))
        shape_base.append(float(judge.shape_alignment(pictures, refs).mean()))
    return {"held-out drawn picture of the concept": float(np.mean(own)),
            "held-out drawn pictures of the other concepts": float(np.mean(other)),
            "toy base on the class prompt": float(np.mean(base)),
            "text alignment of the toy base's class-prompt pictures": float(np.mean(text)),
            "shape alignment: held-out drawn picture of the concept": float(np.mean(shape_own)),
            "shape alignment: held-out drawn pictures of the other concepts": float(np.mean(shape_other)),
            "shape alignment: toy base on the class prompt (it asks for the concept's shape)":
                float(np.mean(shape_base))}


def write_card(judge: IdentityJudge, checks: list[Check], command: str, folder: Path) -> str:
    """Write folder/README.md and return its text."""
    rows = "\n".join(f"| {c.name} | {c.identities} | {c.clean:.3f} | {c.degraded:.3f} |" for c in checks)
    gen = generated_check(judge)
    gen_rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in gen.items())
    text = f"""# Judges of the toy world

## The identity judge (`blocklora.toy.identity`)
A fixed descriptor, no weights: per ring of the object (centre = accent, body = fill pattern, rim =
outline; rings at {list(judge.rings)} object radii), the square roots of its colour proportions on the
toy palette (soft assignment, temperature {judge.temperature}), the border's colour left out.
Image alignment is the mean cosine to the concept's reference pictures (CLIP-I protocol); text
alignment reads the background at the border and the size from the object's extent (threshold
{judge.size_threshold} px). Shape alignment is the mean cosine of a silhouette descriptor: per ring at
{list(judge.shape_rings)} object radii, the magnitudes of the first {judge.harmonics} angular harmonics of
how much of each of {judge.sectors} sectors the object fills, minus their mean over random drawn
identities. Colours alone cannot tell a concept from its palette without its shape (an adapter that
paints colour soup scores like the concept); the silhouette can (tests/test_identity_judge.py). The
module docstring says why it is not a trained network. Nothing in it was fitted to the benchmark's
CONCEPTS.

Command: `{command}`

### Validation on fresh drawn pictures
Pair AUC: every pair of 4 pictures per identity, same identity vs different identity, scored by the
cosine of the embeddings (shape: same class word vs different, by the silhouette's cosine). \
"degraded": the same pictures through `degrade` (warp, blur, tint, noise,
resampling: roughly what the toy base does to a picture).

| check | identities | clean | degraded |
|---|---|---|---|
{rows}

### On generated pictures
Image alignment = mean cosine to {REFERENCES} reference pictures of the concept, averaged over the
{len(CONCEPTS)} benchmark concepts; the base is sampled with its card's sampler ({SAMPLE_STEPS} DDIM steps,
guidance {GUIDANCE}), seeds {list(SEEDS)}.

| pictures | mean |
|---|---|
{gen_rows}

## judge.safetensors: shape and colour (`blocklora.toy.judge`)
Names the shape and colour of a picture's main object; the toy base's model card scores the base with
it. Train with `python jobs/toy/train_judge.py --steps 1500 --threads 1`.
"""
    (folder / "README.md").write_text(text)
    return text
