"""The documented CLI, run as a user would: separate processes, files in between (each test's commands
run as a prerun job, tests/prerun.py; the test asserts on what they printed and wrote)."""

import concurrent.futures
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from core_helpers import model_code_imported, write_images
from prerun import Runner

ROOT = Path(__file__).resolve().parents[1]


def _cli(run: Runner, *args: str) -> str:
    out = run([sys.executable, "-m", "blocklora", *args], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def help_text(folder: Path, run: Runner) -> str:
    return _cli(run, "--help")


@pytest.mark.prerun(job=help_text)
def test_help_lists_the_commands(prerun):
    text, _ = prerun
    for cmd in ("train", "merge", "generate", "inspect"):
        assert cmd in text


def cli_imports(folder: Path, run: Runner) -> tuple[list[str], str]:
    return model_code_imported("import blocklora.cli, blocklora.method.export, blocklora.method.overlap", run=run)


@pytest.mark.prerun(job=cli_imports)
def test_commands_without_a_base_do_not_import_diffusers(prerun):
    """`inspect`, `merge` and `--help` read artifacts only: they answer without the seconds that
    diffusers and transformers take to import (the artifact module needs neither)."""
    (imported, _), _ = prerun
    assert imported == []


def train_generate_merge_inspect(tmp_path: Path, run: Runner) -> list[str]:
    """Two users train side by side; one generates with both, merges them into a LoRA, inspects them."""
    images = write_images(tmp_path / "img")

    def train(name: str, slot: int) -> str:
        return _cli(run, "train", "--images", str(images), "--name", name, "--class-word", "dog", "--slot", str(slot),
                    "--steps", "2", "--out", str(tmp_path / f"{name}.safetensors"))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(train, ("a", "b"), (1, 2)))
    _cli(run, "generate", "--concepts", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
         "--prompt", "{a} and {b}", "--steps", "2", "--out", str(tmp_path / "img.png"))
    _cli(run, "merge", "--concepts", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
         "--out", str(tmp_path / "lora"))
    return _cli(run, "inspect", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")).splitlines()


@pytest.mark.prerun(job=train_generate_merge_inspect)
def test_train_generate_merge_inspect(prerun):
    lines, tmp_path = prerun
    assert Image.open(tmp_path / "img.png").size == (32, 32)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads(lines[0])["slot"] == 1
    assert json.loads(lines[-1])["max_abs_cosine"] == 0.0


def local_demo(tmp_path: Path, run: Runner) -> str:
    # the toy recipe's quiet penalty draws class pictures of every toy shape: 2 each here, not 8 (-11 s of a core)
    out = run([sys.executable, "jobs/local_demo.py", "--base", "tiny", "--concept", "swirl", "--steps", "2",
               "--num-class-images", "2", "--out", str(tmp_path)], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.prerun(job=local_demo)
def test_local_demo_writes_a_three_row_sheet(prerun):
    """jobs/local_demo.py (the docs' before/after grids): training images, base, merged."""
    stdout, tmp_path = prerun
    assert "trained 'swirl' in slot 0" in stdout
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.height >= 3 * 128 and sheet.width >= 4 * 128
    assert (tmp_path / "swirl.safetensors").stat().st_size > 0


def train_bf16_then_generate_bfloat16(tmp_path: Path, run: Runner) -> None:
    _cli(run, "train", "--images", str(write_images(tmp_path / "img")), "--name", "a", "--class-word", "dog",
         "--steps", "2", "--mixed-precision", "bf16", "--out", str(tmp_path / "a.safetensors"))
    _cli(run, "generate", "--concepts", str(tmp_path / "a.safetensors"), "--prompt", "{a} on grass", "--steps", "2",
         "--dtype", "bfloat16", "--out", str(tmp_path / "img.png"))


@pytest.mark.prerun(job=train_bf16_then_generate_bfloat16)
def test_bf16_mixed_precision_train_then_generate_in_bfloat16(prerun):
    """`--mixed-precision bf16` writes a float32 artifact; `--dtype bfloat16` draws with it merged."""
    from blocklora.method.artifact import ConceptArtifact

    _, tmp_path = prerun
    art = ConceptArtifact.load(tmp_path / "a.safetensors")
    assert {str(v.dtype) for v in art.tensors.values()} == {"torch.float32"}
    assert art.meta.train_config["mixed_precision"] == "bf16"
    assert Image.open(tmp_path / "img.png").size == (32, 32)
