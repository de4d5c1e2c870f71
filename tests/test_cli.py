"""The documented CLI, run as a user would: separate processes, files in between."""

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from core_helpers import model_code_imported, write_images

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "blocklora", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_help_lists_the_commands():
    text = _cli("--help")
    for cmd in ("train", "merge", "generate", "inspect"):
        assert cmd in text


def test_commands_without_a_base_do_not_import_diffusers():
    """`inspect`, `merge` and `--help` read artifacts only: they answer without the seconds that
    diffusers and transformers take to import (the artifact module needs neither)."""
    assert model_code_imported("import blocklora.cli, blocklora.export, blocklora.stats")[0] == []


def test_train_generate_merge_inspect(tmp_path):
    images = write_images(tmp_path / "img")

    def train(name: str, slot: int) -> str:
        return _cli("train", "--images", str(images), "--name", name, "--class-word", "dog", "--slot", str(slot),
                    "--steps", "2", "--out", str(tmp_path / f"{name}.safetensors"))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two users training side by side
        list(pool.map(train, ("a", "b"), (1, 2)))
    _cli("generate", "--concepts", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
         "--prompt", "{a} and {b}", "--steps", "2", "--out", str(tmp_path / "img.png"))
    assert Image.open(tmp_path / "img.png").size == (32, 32)
    _cli("merge", "--concepts", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
         "--out", str(tmp_path / "lora"))
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    lines = _cli("inspect", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")).splitlines()
    assert json.loads(lines[0])["slot"] == 1
    assert json.loads(lines[-1])["max_abs_cosine"] == 0.0


def test_local_demo_writes_a_three_row_sheet(tmp_path):
    """jobs/local_demo.py (the docs' before/after grids): training images, base, merged."""
    # the toy recipe's quiet penalty draws class pictures of every toy shape: 2 each here, not 8 (-11 s of a core)
    out = subprocess.run([sys.executable, "jobs/local_demo.py", "--base", "tiny", "--concept", "swirl", "--steps", "2",
                          "--num-class-images", "2", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trained 'swirl' in slot 0" in out.stdout
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.height >= 3 * 128 and sheet.width >= 4 * 128
    assert (tmp_path / "swirl.safetensors").stat().st_size > 0


def test_bf16_mixed_precision_train_then_generate_in_bfloat16(tmp_path):
    """`--mixed-precision bf16` writes a float32 artifact; `--dtype bfloat16` draws with it merged."""
    from blocklora.artifact import ConceptArtifact

    _cli("train", "--images", str(write_images(tmp_path / "img")), "--name", "a", "--class-word", "dog",
         "--steps", "2", "--mixed-precision", "bf16", "--out", str(tmp_path / "a.safetensors"))
    art = ConceptArtifact.load(tmp_path / "a.safetensors")
    assert {str(v.dtype) for v in art.tensors.values()} == {"torch.float32"}
    assert art.meta.train_config["mixed_precision"] == "bf16"
    _cli("generate", "--concepts", str(tmp_path / "a.safetensors"), "--prompt", "{a} on grass", "--steps", "2",
         "--dtype", "bfloat16", "--out", str(tmp_path / "img.png"))
    assert Image.open(tmp_path / "img.png").size == (32, 32)
