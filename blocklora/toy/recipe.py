"""The toy base's recipe: the training and sampling presets the main job, the local demo and the
benchmarks start from on the pretrained toy base, and which base they use by default.

They live here, not in `blocklora.config`, so that the core never imports the toy world; the entry
points (jobs/, benchmarks/) choose them. Flags still override each field. The settings were measured
on the toy base's concepts: docs/results/README.md.
"""

from __future__ import annotations

from blocklora.config import TINY, AdapterConfig, GenerateConfig, TrainConfig
from blocklora.toy.base import TOY_BASE_DIR
from blocklora.toy.vocabulary import SHAPES

# Token lr 10x the adapter's, as ED-LoRA: toy concepts are mostly colour. The quiet penalty keeps each
# concept's rows off pictures without it, so merged concepts keep what they have alone; over the base's
# pictures of every shape it knows, since the others in a merge are other shapes. 600 steps: the fewest
# at which the screens' three concepts cleared +0.20 image alignment alone over the base (fifteen: +0.16),
# and the best merged picture of the recipes screened (docs/results/identity.md).
TOY_BASE_TRAIN = TrainConfig(steps=600, lr=5e-3, token_lr=5e-2, quiet_weight=0.1, quiet_classes=SHAPES)
# Randomized output erasure at λ = 0.3 (the library's default is 0.1): on 15 concepts nobody drew, paired
# with 0.1, the sum of three keeps +0.029 IA more and Eq. 5 of fifteen +0.009, the concept as strong alone
# (docs/results/identity.md#fifteen-concepts). Erasure acts in training only; the federation's coordinator
# hands it to every client with the slot.
TOY_BASE_ADAPTER = AdapterConfig(erasure=0.3)
# Guidance 4: on the same fifteen concepts, swept over 2-6, the most an Eq. 5 merge of three keeps (96.9% of
# alone, 94.5% at 2) with the sum of three no worse; 6 costs the sum of fifteen. No paired difference from 2
# is clear of noise (docs/results/identity.md#guidance). The library's 5.0 suits Stable Diffusion bases.
TOY_BASE_GENERATE = GenerateConfig(guidance_scale=4.0)


def default_base_spec() -> str:
    """The project's pretrained toy base when this checkout has it, else the random tiny one."""
    return str(TOY_BASE_DIR) if (TOY_BASE_DIR / "model_index.json").is_file() else TINY
