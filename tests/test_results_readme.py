"""docs/results stays navigable: every run folder's README is what its JSON gives, and every folder is
reached by links from docs/results/README.md (benchmarks/results_readme.py)."""

import json
from pathlib import Path

from benchmarks import results_readme as rr


def test_committed_run_readmes_are_current():
    assert rr.update(rr.RESULTS_DIR, check=True) == [], "run `python -m benchmarks.results_readme`"


def test_every_results_folder_is_reachable_from_the_index():
    assert rr.unreachable(rr.RESULTS_DIR) == []


def test_no_link_under_docs_results_points_at_nothing():
    assert rr.broken_links(rr.RESULTS_DIR) == []


def test_every_run_folder_has_a_readme():
    """A run folder: one of docs/results or docs/results/archive, or any folder that holds JSON."""
    tops = (rr.RESULTS_DIR, rr.RESULTS_DIR / "archive")
    runs = [d for d in rr.RESULTS_DIR.rglob("*") if d.is_dir() and (d.parent in tops or any(d.glob("*.json")))]
    assert [d for d in runs if not (d / "README.md").is_file()] == []


def _run(folder: Path, meta: dict, **results: object) -> Path:
    folder.mkdir(parents=True)
    (folder / rr.META).write_text(json.dumps(meta))
    for name, result in results.items():
        (folder / f"{name}.json").write_text(result if isinstance(result, str) else json.dumps(result))
    return folder


ENV = {"device": "cpu", "dtype": "float32", "cpu_count": 2, "torch_threads": 1, "load_avg_1min": 1.5,
       "torch": "2.14", "diffusers": "0.42", "peft": "0.21"}


def test_what_the_json_does_not_hold_is_not_recorded(tmp_path):
    _run(tmp_path / "bare", {"conclusion": "it held"}, result={"benchmark": "merge"})
    text = rr.render(tmp_path / "bare", tmp_path)
    assert "it held" in text
    for field in ("command", "date", "commit", "device", "took", "committed in"):
        assert f"- {field}: not recorded" in text


def test_the_benchmarks_own_record_is_read(tmp_path):
    _run(tmp_path / "a" / "b", {"conclusion": "c", "page": {"title": "Merge", "path": "merge.md#x"},
                                "date": "2026-11-27", "command": "python -m benchmarks.merge_bench"},
         result={"env": ENV, "seconds": 300.0}, notes="7 {\"not\": \"one object\"}")
    text = rr.render(tmp_path / "a" / "b", tmp_path)
    assert "[Merge](../../merge.md#x)" in text  # the page, relative to a nested folder
    assert "`python -m benchmarks.merge_bench`" in text and "2026-11-27" in text and "5.0 min" in text
    assert "cpu (float32, 2 CPU cores, 1 torch thread(s), load 1.5 at the end)" in text
    assert "not one JSON object" in text  # listed, not parsed


def test_a_saved_command_wins_and_a_gpu_part_finds_its_env(tmp_path):
    gpu = {"part": "merge_fp16", "wall_s": 40.0, "cmd": ["python3", "-m", "benchmarks.merge_bench", "--device", "cuda"],
           "result": {"env": {**ENV, "device": "cuda", "device_name": "NVIDIA H200"}}}
    _run(tmp_path / "gpu", {"conclusion": "c", "command": "python from-run-json"}, merge_fp16=gpu)
    text = rr.render(tmp_path / "gpu", tmp_path)
    assert "`python3 -m benchmarks.merge_bench --device cuda`" in text and "from-run-json" not in text
    assert "NVIDIA H200" in text and "40 s" in text


def test_update_is_idempotent_and_check_writes_nothing(tmp_path):
    folder = _run(tmp_path / "run", {"conclusion": "c"}, result={"env": ENV})
    assert rr.update(tmp_path, check=True) == [folder / "README.md"]
    assert not (folder / "README.md").exists()
    assert rr.update(tmp_path) == [folder / "README.md"]
    first = (folder / "README.md").read_text()
    assert rr.update(tmp_path) == [] and (folder / "README.md").read_text() == first


def test_a_folder_no_link_reaches_is_reported(tmp_path):
    (tmp_path / "linked" / "deeper").mkdir(parents=True)
    (tmp_path / "lost").mkdir()
    (tmp_path / "README.md").write_text("[a page](page.md)\n")
    (tmp_path / "page.md").write_text("see [it](linked/) and [a picture](https://example.org/x.png)\n")
    (tmp_path / "linked" / "README.md").write_text("[deeper](deeper/plot.png)\n")
    (tmp_path / "linked" / "deeper" / "plot.png").write_bytes(b"")
    assert rr.unreachable(tmp_path) == [(tmp_path / "lost").resolve()]
    assert rr.broken_links(tmp_path) == []
    (tmp_path / "page.md").write_text("see [it](moved/)\n")
    assert rr.broken_links(tmp_path) == ["page.md: moved/"]
