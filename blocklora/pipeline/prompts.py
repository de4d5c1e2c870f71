"""Prompts that name concepts: `a photo of {my-dog} on a beach` -> `a photo of <blk3> dog on a beach`."""

from __future__ import annotations

import re

REF = re.compile(r"\{([^{}]*)\}")


def concept_refs(prompt: str) -> list[str]:
    """Names referenced as {name} in the prompt, in order of first appearance."""
    seen: list[str] = []
    for name in REF.findall(prompt):
        if name not in seen:
            seen.append(name)
    return seen


def expand(prompt: str, phrases: dict[str, str]) -> str:
    """Replace each {name} with its phrase (trigger tokens + class word); unknown names raise
    KeyError naming every missing concept at once."""
    missing = [n for n in concept_refs(prompt) if n not in phrases]
    if missing:
        raise KeyError(f"prompt names unknown concept(s) {missing}; live: {sorted(phrases)}")
    return REF.sub(lambda m: phrases[m.group(1)], prompt)


def class_picture_prompt(class_word: str) -> str:
    """A concept's class without it: what the base draws the class pictures for, and the prompt they are
    denoised with again by prior preservation and the quiet penalty's bank, so all three agree."""
    return f"a photo of {class_word}"
