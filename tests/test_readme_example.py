"""The README's Python example runs as written, on the tiny base: the user's guide cannot drift from the API."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The python block of the README's section on the library."""
    section = (ROOT / "README.md").read_text().split("## The library in Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # its paths are relative to the repository root
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    assert (tmp_path / "chelsea.safetensors").stat().st_size > 0
    assert set(scope["merged"].phrases()) == {"chelsea"}  # espresso removed, chelsea still merged
    assert min(scope["image"].size) > 0  # a PIL image, at GenerateConfig's default size
