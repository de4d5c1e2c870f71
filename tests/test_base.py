import concurrent.futures

import pytest
import torch

from blocklora.pipeline.base import load_base


def test_tiny_fingerprint_is_stable_and_survives_a_save_load(tiny_base, tmp_path):
    assert load_base("tiny").fingerprint == tiny_base.fingerprint
    tiny_base.pipe.save_pretrained(tmp_path / "tiny")
    assert load_base(str(tmp_path / "tiny")).fingerprint == tiny_base.fingerprint
    # a half-precision replica or client of the same files agrees on it (and is loaded in that dtype)
    half = load_base(str(tmp_path / "tiny"), dtype=torch.bfloat16)
    assert half.fingerprint == tiny_base.fingerprint and half.pipe.unet.dtype == torch.bfloat16
    assert {p.dtype for p in half.pipe.text_encoder.parameters()} == {torch.bfloat16}


def test_embedded_bases_built_side_by_side_are_the_same_weights():
    """Threads that load embedded bases at once (coordinators started together) each get the weights
    a lone load gets: the builders share torch's global generator, so they take turns."""
    specs = ["tiny", "tiny-sd2", "tiny-sdxl"] * 2
    alone = {spec: load_base(spec).fingerprint for spec in set(specs)}
    with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
        together = list(pool.map(lambda spec: load_base(spec).fingerprint, specs))
    assert together == [alone[spec] for spec in specs]


def test_tokenizer_matches_clip_ids(tiny_base):
    # ids of OpenAI's CLIP tokenizer (as shipped with Stable Diffusion) for this sentence
    assert tiny_base.pipe.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        load_base(str(tmp_path / "nope"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1"):
        load_base("nobody-here/no-such-model")
