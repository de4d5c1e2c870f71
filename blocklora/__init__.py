"""blocklora: concepts that own disjoint row blocks, so any set of them merges exactly and instantly."""

from blocklora.artifact import ConceptArtifact, InvalidArtifact
from blocklora.base import Base, load_base
from blocklora.config import AdapterConfig, GenerateConfig, TrainConfig
from blocklora.layer import BlockLoRALinear
from blocklora.merge import LiveMerge

__all__ = ["AdapterConfig", "Base", "BlockLoRALinear", "ConceptArtifact", "GenerateConfig", "InvalidArtifact",
           "LiveMerge", "TrainConfig", "load_base"]
