"""The method: concepts that own disjoint row blocks of a base's linear layers.

partition.py (which rows a slot owns; one `block_delta`) · layer.py (`BlockLoRALinear`, its erasure and
merge) · inject.py (wrapping a base's layers) · tokens.py (trigger tokens per slot) · slots.py (`SlotSpace`:
does an artifact fit this base) · artifact.py (a trained concept as one safetensors file) · merge.py
(`LiveMerge`: any set of concepts into the weights, exactly) · residual.py (`ConceptBank`: per-request
subsets as residuals, Ray-free) · export.py (to a plain diffusers LoRA) · overlap.py (weight-space overlap
of a set). Imports nothing from the toy world, Ray, federation or serving.
"""
