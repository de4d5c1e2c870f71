"""The benchmark scripts in --quick mode: JSON shape and the invariants that must hold exactly
(never timings, which belong to the benchmark reports, not to tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.common import random_artifact, saved_activation_bytes
from benchmarks.retention import study as retention
from benchmarks.retention.study import ARMS
from blocklora.config import AdapterConfig, TrainConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.export import to_lora_state_dict
from blocklora.method.inject import layout
from blocklora.pipeline.base import load_base
from prerun import Job, Runner

ROOT = Path(__file__).resolve().parents[1]


def run_module(run: Runner, module: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run `python -m benchmarks.<module> --quick` to success, as a prerun job's process (one thread, idle
    priority: tests/prerun.py; the tests assert no timings)."""
    proc = run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--threads", "1", "--out", str(out), *extra],
               cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_quick(run: Runner, module: str, out: Path, *extra: str) -> dict:
    """Run `python -m benchmarks.<module> --quick` and parse its last stdout line."""
    result = json.loads(run_module(run, module, out, *extra).stdout.strip().splitlines()[-1])
    assert result["quick"] is True
    assert {"device", "dtype", "torch"} <= set(result["env"])
    return result


def quick_job(module: str, cached: bool = False) -> Job:
    """The prerun job of a benchmark's --quick test: run it and return its JSON. Its output goes to the
    job's folder, or with `cached` to folder/out beside its --cache folder/cache."""
    def job(folder: Path, run: Runner) -> dict:
        if cached:
            return run_quick(run, module, folder / "out", "--cache", str(folder / "cache"))
        return run_quick(run, module, folder)
    job.__name__ = f"{module}_quick"  # the job's folder name
    return job


def test_plain_lora_export_applies_the_same_delta():
    base = load_base("tiny", device="cpu")
    cfg = AdapterConfig(rank=2, text_targets=())
    lay = layout(base.pipe, cfg)
    art = random_artifact(base, cfg, lay, slot=3, seed=0)
    ConceptArtifact.from_bytes(art.to_bytes())  # a valid artifact by the loader's own checks
    sd = to_lora_state_dict([art])  # one concept: B padded with zero rows to m x r
    for key in lay:
        dense = sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]
        delta = art.delta(key)
        assert torch.equal(dense != 0, delta != 0)  # the same rows, and only those, are touched
        # a full (m x r) @ (r x n) product and the owned-rows product may take different BLAS paths,
        # so the values agree to rounding, not always bit for bit
        torch.testing.assert_close(dense, delta, rtol=1e-6, atol=1e-7)


def test_saved_activation_bytes_counts_what_autograd_keeps():
    a, b = torch.randn(100, requires_grad=True), torch.randn(100)
    assert saved_activation_bytes(lambda: a * b, exclude=[]) == b.nbytes  # d(a*b)/da needs b only
    assert saved_activation_bytes(lambda: a * b, exclude=[b]) == 0


@pytest.mark.slow
@pytest.mark.prerun(job=quick_job("merge_bench"))
def test_merge_bench_quick_is_exact(prerun):
    r, out = prerun
    ours, theirs = r["exactness"]["r4"]["blocklora"], r["exactness"]["r4"]["diffusers-peft"]
    assert ours["max_abs_diff_vs_dense"] == 0.0
    assert ours["max_abs_diff_vs_fresh"] == 0.0
    assert ours["restore_max_abs_diff"] == 0.0
    assert theirs["max_abs_diff_vs_dense"] >= 0.0
    assert {(row["method"], row["N"]) for row in r["rows"]} == {(m, n) for m in ("blocklora", "diffusers-peft")
                                                                 for n in r["N"]}
    assert all(row["add_s"] > 0 and row["extra_bytes_torch"] > 0 for row in r["rows"])
    assert {"ours_add_growth", "speedup_add_at_max_N"} <= set(r["summary"]["r4"])
    assert (out / "merge_speed.csv").exists() and (out / "merge_add.png").exists()


@pytest.mark.slow
@pytest.mark.prerun(job=quick_job("train_bench"))
def test_train_bench_quick_reports_both_arms(prerun):
    r, out = prerun
    rows = {(row["model"], row["arm"]): row for row in r["rows"]}
    assert set(rows) == {(m, a) for m in ("tiny", "sd15-shaped") for a in ("blocklora", "peft-lora")}
    for model in ("tiny", "sd15-shaped"):
        ours, theirs = rows[model, "blocklora"], rows[model, "peft-lora"]
        assert ours["adapter_params"] < theirs["adapter_params"]  # owned rows of B only
        assert ours["step_s_median"] > 0 and theirs["activation_bytes"] > 0
        assert ours["upload_bytes"] > 0 and theirs["upload_bytes"] > 0
    assert (out / "train_cost.csv").exists() and (out / "train_step.png").exists()


@pytest.mark.prerun(job=quick_job("layer_bench"))
def test_layer_bench_quick_times_each_arm_per_layer(prerun):
    """The chain of 32 wrapped linears: every arm timed once a round, the ratios the row's own numbers.
    Which arm is faster is the benchmark's finding, not the test's: the suite times it on a busy
    machine (CI once saw the plain linear at 16 tokens slower than both adapters)."""
    r, out = prerun
    (row,) = r["rows"]
    us = row["us_per_layer"]
    assert set(us) == {"linear", "peft-lora", "blocklora"} and row["tokens"] == 16
    assert all(t > 0 and row["round_us_per_layer"][arm] == [t] for arm, t in us.items())  # --quick: one round
    assert row["blocklora_vs_peft"] == us["blocklora"] / us["peft-lora"]
    assert row["adapter_cost_ratio"] == (us["blocklora"] - us["linear"]) / (us["peft-lora"] - us["linear"])
    assert row["kernels_per_layer"] == {"linear": None, "peft-lora": None, "blocklora": None}  # counted on a GPU
    assert json.loads((out / "layer.json").read_text()) == r


def retention_quick_twice(folder: Path, run: Runner) -> tuple[dict, subprocess.CompletedProcess]:
    """The quick study, then a rerun on the same cache."""
    args = ("--cache", str(folder / "cache"), "--ns", "2", "1", "2")
    return run_quick(run, "retention", folder / "out", *args), run_module(run, "retention", folder / "again", *args)


@pytest.mark.slow
@pytest.mark.prerun(job=retention_quick_twice)
def test_retention_quick_covers_every_arm(prerun):
    (r, again), folder = prerun
    assert r["profile"]["ns"] == [1, 2]  # --ns: the set sizes scored, sorted and once each
    assert set(r["methods"]) == set(ARMS)
    assert {"blocklora", "blocklora-mean"} <= set(r["methods"])  # both α arms: sum and Eq. 5's 1/N
    for name, m in r["methods"].items():
        if name.startswith("blocklora") and "no-blocks" not in name:  # disjoint rows: exactly orthogonal dW
            assert m["max_abs_cosine"] == 0.0 and m["mean_sign_conflict"] == 0.0, name
        for key, value in m.items():  # every interval is well-formed
            if isinstance(value, dict):
                low, estimate, high = value["low"], value["estimate"], value["high"]
                assert low <= estimate + 1e-9 and estimate <= high + 1e-9, (name, key)
    assert {c["arm"] for c in r["criteria"]} == {"blocklora", "blocklora-mean"}
    for c in r["criteria"]:
        assert c["interval"]["low"] <= c["interval"]["high"]
    assert set(r["lr_factors"]) and all(f > 0 for f in r["lr_factors"].values())
    scores = (folder / "out" / "scores.csv").read_text().splitlines()
    profile = r["profile"]
    rows = len(ARMS) * len(profile["ns"]) * profile["concepts"] * len(profile["seeds"])
    assert len(scores) - 1 == rows  # one row per (arm, N, concept, seed)
    for name in ("image_alignment_vs_N.png", "methods.csv", "criteria.csv", "tables.md", "interference.csv"):
        assert (folder / "out" / name).exists()
    # a rerun on the same cache trains and scores nothing, and reports the same figures
    lines = again.stdout.strip().splitlines()
    assert not [line for line in lines if "ETA" in line], lines
    assert sum("scores cached" in line for line in lines) == len(ARMS)
    assert json.loads(lines[-1])["methods"] == r["methods"]


def test_retention_profile_takes_its_set_sizes_and_lr_tries_from_the_command_line():
    assert retention.chosen_profile("recipe-matched") == retention.PROFILES["recipe-matched"]
    chosen = retention.chosen_profile("recipe-matched", [15, 1, 15], 3)
    assert (chosen.ns, chosen.calib_tries, chosen.concepts) == ((1, 15), 3, 16)
    with pytest.raises(SystemExit, match="--calib-tries must be >= 0, got -1"):
        retention.chosen_profile("recipe", None, -1)


def test_retention_scores_ablations_at_the_two_ends_and_methods_on_the_whole_curve():
    ns = retention.PROFILES["full"].ns
    assert retention.arm_ns("blocklora-no-blocks-mean", ns) == (1, 15)
    assert retention.arm_ns("blocklora-no-erasure", ns) == (1, 15)
    assert retention.arm_ns("blocklora-mean", ns) == retention.arm_ns("ties", ns) == ns


def test_retention_progress_times_each_kind_of_work_at_its_own_rate(capsys):
    """A training costs ~20x a scored window: the ETA counts each kind's remaining work at that kind's
    measured rate (a lower bound, "≥", while one kind is untimed), and loading cached work (never
    planned) prints no line and counts against no rate."""
    p = retention.Progress({"training": 2, "window": 100, "other": 0})
    time.sleep(0.3)
    p("trained one", "training")
    time.sleep(0.3)
    p.skip()  # a cached training was loaded: not timed as a window
    p("scored one window", "window")
    first, second = capsys.readouterr().out.splitlines()
    assert "ETA ≥  0.0 min] trained one" in first  # 1 training (~0.3 s) timed, 100 windows not yet
    assert "ETA  " in second
    eta = float(second.split("ETA")[1].split("min")[0])
    assert eta * 60 < 0.3 * 2  # 1 training (~0.3 s) + 99 windows (~0 s) left, not 101 at the mean rate


@pytest.mark.prerun(job=quick_job("merge_rules", cached=True))
def test_merge_rules_quick_pairs_every_rule_with_eq5(prerun):
    """At N = 2 two rules coincide with others exactly (α = 2/N is the sum, α = 1/2 is Eq. 5): the same
    residual, prompts and seeds must give the same scores, and Eq. 5 against itself differs by 0."""
    r, folder = prerun
    rules = r["rules"]
    assert r["n"] == 2 and {"alone (N = 1)", "trigger token only", "gated k/v + 1/N elsewhere"} <= set(rules)
    assert rules["α = 2/N"]["image_alignment"] == rules["α = 1 (sum)"]["image_alignment"]
    assert rules["α = 1/2"]["image_alignment"] == rules["α = 1/N (Eq. 5)"]["image_alignment"]
    assert rules["α = 1/N (Eq. 5)"]["image_alignment_minus_eq5"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    assert set(r["prior_drift_at_n"]) == {"α = 1/N (Eq. 5)", "gated k/v + 1/N elsewhere"}
    assert "Merge rules at N = 2" in (folder / "out" / "tables.md").read_text()


def test_retention_refuses_an_arm_the_base_cannot_hold_before_training(tmp_path):
    """Orthogonal Adaptation needs slots x rank <= every target's input size; 16 x 4 does not fit the
    tiny base, and the run says so at once, naming the arm, with nothing trained or written."""
    study = AdapterConfig(rank=4, num_slots=16)
    with pytest.raises(ValueError, match="arm 'orthogonal' cannot run on this base: .*16 slots x rank 4"):
        retention.run(retention.PROFILES["quick"], "tiny", TrainConfig(), study, ("lora-mean", "orthogonal"),
                      0.05, tmp_path / "out", tmp_path / "cache", 3.0)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def gpu_suite_quick(out: Path, run: Runner) -> None:
    # the 70 s default guards a GPU lease; here each part runs at idle priority beside the Ray tests (a
    # CI run timed mixed_bf16 out under the library benchmark's load), and only the structure is checked
    proc = run([sys.executable, "-m", "benchmarks.gpu_suite", "--quick", "--device", "cpu", "--part-timeout", "600",
                "--parts", "layer_fp32", "mixed_bf16", "e2e_fp16", "--out", str(out)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.prerun(job=gpu_suite_quick)
def test_gpu_suite_quick_writes_json_and_table(prerun):
    """The GPU suite's structure on the CPU: the parts' JSON, the suite's JSON and the markdown table;
    the mixed-precision part trains both arms on the same draws, so their losses agree closely."""
    _, out = prerun
    suite = json.loads((out / "suite.json").read_text())
    assert suite["quick"] is True and [p["part"] for p in suite["parts"]] == ["layer_fp32", "mixed_bf16", "e2e_fp16"]
    assert [p.get("error") for p in suite["parts"]] == [None, None, None]  # a failed part says why here
    layer = json.loads((out / "layer_fp32.json").read_text())["result"]
    assert layer["env"]["dtype"] == "float32" and [row["tokens"] for row in layer["rows"]] == [16]
    e2e = json.loads((out / "e2e_fp16.json").read_text())["result"]
    assert e2e["env"]["dtype"] == "float16" and e2e["merged"] == 15 and e2e["images_per_s"] > 0
    mixed = json.loads((out / "mixed_bf16.json").read_text())["result"]
    assert mixed["env"]["dtype"] == "bfloat16" and set(mixed["arms"]) == {"no", "bf16"}
    assert all(len(arm["losses"]) == mixed["steps"] and arm["step_s_median"] > 0 for arm in mixed["arms"].values())
    assert abs(mixed["loss_ratio"] - 1) < mixed["target"] and 0 < mixed["lora_b_rel_diff"] < 1
    table = (out / "suite.md").read_text()
    assert "| e2e_fp16 |" in table and "| mixed_bf16 |" in table and "| layer_fp32 | fwd + bwd per layer" in table


@pytest.mark.prerun(job=quick_job("concept_capacity", cached=True))
def test_concept_capacity_quick_scores_each_recipe(prerun):
    r, folder = prerun
    results = r["results"]
    assert set(results) == {"base, class prompt", "default's trigger embedding, no weights",
                            "attention, 16 slots (the default)", "attention, 1 slot (every row)",
                            "whole UNet fine-tuned, lr 0.0001 (not an adapter)"}
    assert "rows_per_slot" not in results["whole UNet fine-tuned, lr 0.0001 (not an adapter)"]  # no slot: every weight
    # the toy UNet's attention projections have 32-128 rows: 2-8 per slot at 16 slots, all at 1
    assert results["attention, 16 slots (the default)"]["rows_per_slot"] == [2, 8]
    assert results["attention, 1 slot (every row)"]["rows_per_slot"] == [32, 128]
    for scores in results.values():
        assert set(scores["per_concept"]) == {"ember"}
        assert -1 <= scores["shape_alignment"]["estimate"] <= 1 and 0 <= scores["image_alignment"]["estimate"] <= 1
    assert results["attention, 16 slots (the default)"]["image_alignment_minus_default"]["estimate"] == 0
    assert (folder / "out" / "sheet.png").exists()


IDENTITY_QUICK = quick_job("identity_check")  # one run, read by the two tests below


@pytest.mark.slow
@pytest.mark.prerun(job=IDENTITY_QUICK)
def test_identity_check_quick_scores_every_condition_with_intervals(prerun):
    """Two random identities trained through `python -m blocklora train`, drawn alone, with only their
    token, alone at Eq. 5's weight, merged by Eq. 5 and by sum, and the class prompt after merging, beside
    the drawn pictures through the VAE (the ceiling); every mean has an interval."""
    r, out = prerun
    conds = r["conditions"]
    assert set(conds) == {"base on class prompt", "drawn, VAE round trip", "alone", "token only", "alone at 1/2",
                          "Eq. 5, N = 2", "sum, N = 2", "class prompt, Eq. 5 N = 2"}
    for row in conds.values():
        assert row["ci"][0] <= row["ia"] <= row["ci"][1] and len(row["per_concept"]) == 2
    for cond in ("alone", "drawn, VAE round trip"):
        assert conds[cond]["gain_ci"][0] <= conds[cond]["gain_over_base"] <= conds[cond]["gain_ci"][1]
    alone, drawn = conds["alone"], conds["drawn, VAE round trip"]
    assert alone["share_of_attainable"] == pytest.approx(alone["gain_over_base"] / drawn["gain_over_base"])
    # the tiny base's VAE is random: what it keeps of a drawn picture is not the picture
    assert drawn["ia"] < 0.9
    assert all("kept" in row for cond, row in conds.items()
               if cond not in ("alone", "base on class prompt", "drawn, VAE round trip"))
    assert all(len(row["per_seed"]) == 2 and len(row["per_seed"][0]) == r["seeds"] for row in conds.values())
    assert len(r["identities"]) == 2 and (out / "contact_sheet.png").is_file()


def test_identity_check_refuses_unknown_named_concepts_and_merges_larger_than_its_set(tmp_path):
    """Bad --named / --ns are refused by name before anything trains or writes."""
    check = [sys.executable, "-m", "benchmarks.identity_check", "--out", str(tmp_path / "out")]
    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([*check, *flags], cwd=ROOT, capture_output=True, text=True)

    unknown = run("--named", "ember", "nobody")
    assert unknown.returncode == 2 and "no concept(s) ['nobody']" in unknown.stderr
    too_many = run("--named", "ember", "frost", "--ns", "3")
    assert too_many.returncode == 2 and "larger than the 2 concepts scored" in too_many.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.prerun(job=IDENTITY_QUICK)
def test_identity_compare_pairs_runs_of_the_same_identities_only(prerun, tmp_path):
    """A run paired with itself differs by exactly 0 in every condition; a run of other identities is
    refused by name, since its pictures pair with nothing."""
    _, out = prerun
    compare = [sys.executable, "-m", "benchmarks.identity_compare", str(out)]
    same = subprocess.run([*compare, str(out)], cwd=ROOT, capture_output=True, text=True)
    assert same.returncode == 0, same.stderr[-3000:]
    result = json.loads(same.stdout.strip().splitlines()[-1])
    assert result["paired_over"] == "concepts x seeds"
    rows = result["minus_first"][str(out)]
    assert set(rows) == set(json.loads((out / "result.json").read_text())["conditions"])
    assert all(v == [0.0, 0.0, 0.0] for row in rows.values() for v in row.values())
    assert rows["alone"]["gain_over_base"] == [0.0, 0.0, 0.0] and "kept" in rows["Eq. 5, N = 2"]
    other = json.loads((out / "result.json").read_text())
    other["identities"][0]["outline"] = "a colour nobody drew"
    (tmp_path / "result.json").write_text(json.dumps(other))
    refused = subprocess.run([*compare, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "scored other identities or seeds" in refused.stderr


BASE = ROOT / "models" / "toy-base"


def base_compare_quick_of_one_base_twice(folder: Path, run: Runner) -> dict:
    alias = folder / "same-base"
    alias.symlink_to(BASE, target_is_directory=True)
    return run_quick(run, "base_compare", folder / "out", "--bases", str(BASE), str(alias))


@pytest.mark.prerun(job=base_compare_quick_of_one_base_twice)
def test_base_compare_quick_pairs_a_base_with_itself(prerun):
    """The same base under two names draws the same pictures: every paired difference is exactly 0."""
    result, folder = prerun
    base, alias = BASE, folder / "same-base"
    first, second = result["bases"][str(base)], result["bases"][str(alias)]
    assert first["shape"] == second["shape"] and first["colour"] == second["colour"]
    assert second["shape_minus_first"] == second["colour_minus_first"] == [0.0, 0.0, 0.0]
    assert set(first["shape_by_class"]) == {"circle", "square", "triangle", "star", "cross", "heart"}
    assert len(result["pairs"]) == 12 and (folder / "out" / "compare.png").is_file()


def test_interference_groups_every_layer_a_variant_trains_and_names_a_stray_one():
    """The diagnosis's layer groups cover every target any retention arm injects (the feed-forward variant's
    too, which once stopped a run after its trainings), and a layer in no group is a clear error."""
    from benchmarks.retention.eval import LAYER_GROUPS, group_of

    pipe = load_base("tiny").pipe
    keys = {key for m in retention.ALL_METHODS.values() for key in layout(pipe, m.adapter_config(AdapterConfig()))}
    groups = {key: group_of(key) for key in keys}
    assert (set(groups.values()) == {"cross-attn k/v", "cross-attn q/out", "self-attn", "feed-forward"}
            < set(LAYER_GROUPS))
    with pytest.raises(ValueError, match="'unet.conv_in' is in no group"):
        group_of("unet.conv_in")


SMALL_SUITE = """import time

def test_sleeps():
    time.sleep(0.3)

def test_spins():
    start = time.process_time()
    while time.process_time() - start < 0.3:
        pass
"""


def suite_cpu_of_a_small_suite(folder: Path, run: Runner) -> subprocess.CompletedProcess:
    (folder / "test_small.py").write_text(SMALL_SUITE)
    return run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.suite_cpu",
                str(folder / "test_small.py")], cwd=ROOT, env={**os.environ, "SUITE_CPU_OUT": str(folder / "cpu.json")})


@pytest.mark.prerun(job=suite_cpu_of_a_small_suite)
def test_suite_cpu_records_each_phase_and_the_cpu_it_took(prerun):
    """The suite profiler (benchmarks/suite_cpu.py): three phases a test; a test that spins 0.3 s of CPU is
    seen to take at least that much of the machine's, one that sleeps takes its wall time."""
    done, folder = prerun
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((folder / "cpu.json").read_text())
    phases = {(test.split("::")[1], phase): (wall, cpu) for test, phase, wall, cpu in result["phases"]}
    assert set(phases) == {(t, p) for t in ("test_sleeps", "test_spins") for p in ("setup", "call", "teardown")}
    assert phases["test_sleeps", "call"][0] >= 0.3 and phases["test_spins", "call"][1] >= 0.25
    assert abs(result["floor_s"] - result["cpu_s"] / result["cores"]) <= 0.1 and 0 < result["busy"]
    assert len(result["modules"]) == 1 and "suite_cpu: " in done.stdout


@pytest.mark.slow
def test_library_scale_quick_uploads_serves_and_checks_every_picture(tmp_path):
    """The library benchmark end to end on a small library (8 then 24 concepts, 4 clients over HTTP, Ray
    and Serve on 127.0.0.1): every upload accepted, every request answered, no picture wrong, each cache
    budget exercised (its evictions counted), and its files written."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.library_scale", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["sizes"] == [8, 24] and [row["concepts"] for row in r["curve"]] == [8, 24]
    served = [row["serve_full_budget"] for row in r["curve"]] + r["budgets"]
    assert r["wrong_pictures"] == 0 and all(s["wrong_pictures"] == 0 and s["checked_pictures"] > 0 for s in served)
    assert all(s["non_200"] == 0 and s["ok"] == s["requests"] > 0 for s in served)
    assert all(row["upload_per_s"] > 0 for row in r["curve"])
    by_budget = {b["budget_pct"]: b for b in r["budgets"]}
    assert by_budget[100]["cache_evictions"] == 0 and by_budget[10]["cache_evictions"] > 0
    assert {"README.md", "library_scale.png", "results.json"} <= {p.name for p in tmp_path.iterdir()}
