"""The diffusers side: loading a base and running it.

base.py (the tiny bases, a folder or a hub id; the weights' fingerprint) · tokenizer.py (the embedded CLIP
tokenizer) · precision.py (dtype names, autocast) · prompts.py (concept names in prompts) · conditioning.py
(prompts to text-encoder states) · generate.py (pictures and contact sheets).
"""
