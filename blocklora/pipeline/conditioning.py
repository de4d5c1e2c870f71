"""Prompt -> UNet conditioning for SD1.x/2.x (one text encoder) and SDXL (two, plus time ids)."""

from __future__ import annotations

import torch

from blocklora.pipeline.base import Base


def _tokenize(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


def encode_prompts(base: Base, prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
    """(encoder_hidden_states, added_cond_kwargs); gradients flow into trainable embeddings."""
    dev = base.pipe.unet.device
    encoders, tokenizers = base.text_encoders, base.tokenizers
    if len(encoders) == 1:
        [(comp, te)] = encoders.items()
        return te(_tokenize(tokenizers[comp], prompts, dev))[0], None
    # SDXL: penultimate hidden states of both encoders side by side; pooled output of the second
    states, pooled = [], None
    for comp, te in encoders.items():
        out = te(_tokenize(tokenizers[comp], prompts, dev), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    res = base.resolution
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * len(prompts), device=dev, dtype=states[0].dtype)
    return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}
