"""blocklora: concepts that own disjoint row blocks, so any set of them merges exactly and instantly.

The names below load on first use: importing one light module (`blocklora.config`, `blocklora.training.data`)
must not drag in diffusers and transformers, which take seconds to import (a client job's driver
only needs the configs)."""

from importlib import import_module
from typing import Any

_EXPORTS = {"ConceptArtifact": "method.artifact", "InvalidArtifact": "method.artifact",
            "BlockLoRALinear": "method.layer", "LiveMerge": "method.merge",
            "Base": "pipeline.base", "load_base": "pipeline.base",
            "AdapterConfig": "config", "GenerateConfig": "config", "TrainConfig": "config",
            "PrecisionConfig": "config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blocklora' has no attribute {name!r}")
    return getattr(import_module(f"blocklora.{_EXPORTS[name]}"), name)
