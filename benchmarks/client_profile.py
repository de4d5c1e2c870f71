"""Where a client job's time goes, and its step rate against `blocklora train`, in one run.

    python -m benchmarks.client_profile [--base models/toy-base] [--steps 100] [--repeats 1] [--out FILE]

Starts its own Ray head on 127.0.0.1 (2 CPUs) and a coordinator on the base, then alternates the
two arms `--repeats` times, so both see the same load on this shared machine:
- client: one real client job, submitted with the CLI the README shows;
- plain: `python -m blocklora train` on the same pictures, base, steps and batch, with as many
  torch threads as the client's training worker had (it reports them).
Both print the same summary line from the one step loop (`blocklora.training.trainer.Progress`): the
steady-state step rate after the first step. The client job also prints wall-clock marks of its
phases, which `devtools.job_profile.phase_seconds` turns into the profile; this script adds the
submit and the end. The last stdout line is one JSON object; the load average is recorded with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit
from blocklora.config import TrainConfig
from blocklora.toy.recipe import default_base_spec
from devtools.job_profile import marks_from_log, phase_seconds
from devtools.local_cluster import VENV_BIN, LocalCluster

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "examples" / "concepts" / "chelsea"
STEADY = re.compile(r"trained to step \d+: ([\d.]+) steps/s steady .*, (\d+) torch thread")


def steady_rate(output: str) -> tuple[float, int]:
    """The steady steps/s and the torch threads from the one step loop's closing line."""
    found = STEADY.findall(output)
    if not found:
        raise RuntimeError(f"no steady-rate line in:\n{output[-3000:]}")
    return float(found[-1][0]), int(found[-1][1])


def plain_train(base: str, work: Path, steps: int, threads: int) -> tuple[float, int]:
    """`blocklora train` as a user runs it, with `threads` torch threads; its steady steps/s. In a
    session of its own, like a user's terminal: with the kernel's autogroup scheduling (on here) CPU
    is shared between sessions first, and the Ray cluster's workers run in the cluster's session."""
    out = subprocess.run([str(VENV_BIN / "python"), "-m", "blocklora", "train", "--base", base, "--images", str(IMAGES),
                          "--name", "plain", "--class-word", "cat", "--slot", "15", "--steps", str(steps),
                          "--out", str(work / "plain.safetensors")],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True,
                         check=True, start_new_session=True)
    return steady_rate(out.stdout)


def client_job(cluster: LocalCluster, work: Path, name: str, steps: int) -> tuple[dict, str]:
    """Submit one client job and follow it; its marks plus this side's submit/done marks, and its log."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    t_submit = time.time()
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
         "--submission-id", name, "--no-wait", "--", "python", "jobs/client_train.py", "--images", str(IMAGES),
         "--class-word", "cat", "--name", name, "--steps", str(steps),
         "--token-file", str(work / f"{name}.token"), "--storage-path", str(work / "runs")],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, check=True)
    t_submitted = time.time()
    client = JobSubmissionClient(cluster.dashboard_url)
    while not (status := client.get_job_status(name)).is_terminal():
        time.sleep(0.2)
    t_done = time.time()
    log = client.get_job_logs(name)
    marks = marks_from_log(log)
    if status != JobStatus.SUCCEEDED or marks is None:
        raise RuntimeError(f"client job {name} ended {status}:\n{log[-4000:]}")
    return marks | {"t_submit": t_submit, "t_submitted": t_submitted, "t_done": t_done}, out.stdout + out.stderr + log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=default_base_spec())
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1, help="client/plain pairs, alternating")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = ap.parse_args()

    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="client-profile-") as tmp, LocalCluster(num_cpus=2, cwd=REPO) as cluster:
        work = Path(tmp)
        up = subprocess.run([str(VENV_BIN / "python"), "jobs/start_coordinator.py", "--base-model", args.base,
                             "--state-dir", str(work / "state"), "--address", cluster.address],
                            cwd=REPO, env=cluster.env, capture_output=True, text=True)
        if up.returncode:
            raise RuntimeError(f"the coordinator did not start:\n{up.stdout[-2000:]}\n{up.stderr[-3000:]}")
        for i in range(args.repeats):
            marks, log = client_job(cluster, work, f"profile-{i}-{int(time.time())}", args.steps)
            client, threads = steady_rate(log)
            plain, _ = plain_train(args.base, work, args.steps, threads)
            run = {"phases_s": phase_seconds(marks), "total_s": round(marks["t_done"] - marks["t_submit"], 2),
                   "startup_submit_to_first_step_s": round(marks["t_first_step"] - marks["t_submit"], 2),
                   "client_steady_steps_per_s": client, "plain_steady_steps_per_s": plain, "torch_threads": threads,
                   "step_rate_ratio_client_over_plain": round(client / plain, 3), "load_avg_1min": os.getloadavg()[0]}
            runs.append(run)
            print(json.dumps(run, indent=1), flush=True)
        print("--- what the last client job printed:\n" + log[-4000:], flush=True)
    ratio = statistics.median(r["step_rate_ratio_client_over_plain"] for r in runs)
    base = os.path.relpath(args.base, REPO) if Path(args.base).is_dir() else args.base
    result = {"benchmark": "client_profile", "base": base, "steps": args.steps, "batch_size": TrainConfig.batch_size,
              "cluster_cpus": 2, "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "runs": runs,
              "median_step_rate_ratio": ratio,
              "median_startup_s": statistics.median(r["startup_submit_to_first_step_s"] for r in runs)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    emit(result)


if __name__ == "__main__":
    main()
