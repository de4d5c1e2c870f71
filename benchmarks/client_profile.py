"""Where a client job's time goes: one `ray job submit … client_train.py` split into phases.

    python -m benchmarks.client_profile [--base models/toy-base] [--steps 100] [--repeats 1]

Starts its own Ray head on 127.0.0.1 (2 CPUs) and a coordinator on the base, then alternates the
two arms `--repeats` times in one run, so both see the same load on this shared machine:
- plain: the plain trainer's steady-state step rate (`blocklora.trainer.ConceptTrainer`, one torch
  thread, the same thread count Ray gives a 1-CPU training worker), in this process;
- client: one real client job, submitted with the CLI the README shows. The job prints wall-clock
  marks of its phases (`client phases {json}`, time.time() on this node), from which the profile
  is the difference of consecutive marks; the submit and the end are taken here.
The last stdout line is one JSON object (phases in seconds, the step-rate ratio, the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit
from blocklora.base import default_base_spec, load_base
from blocklora.config import AdapterConfig, TrainConfig
from blocklora.data import load_concept_images
from blocklora.trainer import ConceptTrainer
from federation.local_cluster import VENV_BIN, LocalCluster

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "examples" / "concepts" / "chelsea"
PHASES_PREFIX = "client phases "

# (phase, from mark, to mark): consecutive wall-clock marks of one job, in the order they happen
PHASES = (
    ("submit CLI: start, package + upload the working dir", "t_submit", "t_submitted"),
    ("job start: supervisor, unpack code, driver process", "t_submitted", "t_driver_start"),
    ("driver imports (ray, torch, blocklora)", "t_driver_start", "t_imported"),
    ("connect, register, reserve", "t_imported", "t_reserved"),
    ("read the pictures (Ray Data)", "t_data_start", "t_data_read"),
    ("worker start: Train controller + worker process", "t_data_read", "t_worker_start"),
    ("base load in the worker", "t_worker_start", "t_base_loaded"),
    ("dataset shard + trainer set-up", "t_base_loaded", "t_loop_start"),
    ("first step", "t_loop_start", "t_first_step"),
    ("steps 2..N (compute, reporting, checkpoints)", "t_first_step", "t_last_step"),
    ("last checkpoint + training teardown", "t_last_step", "t_fit_returned"),
    ("upload", "t_upload_start", "t_uploaded"),
    ("driver exit, job marked done", "t_uploaded", "t_done"),
)


def plain_rate(base_spec: str, steps: int, batch: int) -> float:
    """Steady-state steps/s of the plain trainer (after its first step), one torch thread."""
    base = load_base(base_spec, device="cpu")
    train = TrainConfig(steps=steps, batch_size=batch, resolution=base.resolution)
    images, captions = load_concept_images(IMAGES, train.resolution)
    trainer = ConceptTrainer(base, AdapterConfig(), train, slot=15, name="plain", class_word="cat")
    try:
        trainer.next_step(images, captions)
        t0 = time.perf_counter()
        while trainer.step_count < steps:
            trainer.next_step(images, captions)
        return (steps - 1) / (time.perf_counter() - t0)
    finally:
        trainer.close()


def client_job(cluster: LocalCluster, work: Path, name: str, steps: int, batch: int) -> tuple[dict, str]:
    """Submit one client job and follow it; its marks plus this side's submit/done marks, and its log."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    t_submit = time.time()
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
         "--submission-id", name, "--no-wait", "--", "python", "jobs/client_train.py", "--images", str(IMAGES),
         "--class-word", "cat", "--name", name, "--steps", str(steps), "--batch-size", str(batch),
         "--token-file", str(work / f"{name}.token"), "--storage-path", str(work / "runs")],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, check=True)
    t_submitted = time.time()
    client = JobSubmissionClient(cluster.dashboard_url)
    while not (status := client.get_job_status(name)).is_terminal():
        time.sleep(0.2)
    t_done = time.time()
    log = client.get_job_logs(name)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"client job {name} ended {status}:\n{log[-4000:]}")
    line = next(ln for ln in log.splitlines() if ln.startswith(PHASES_PREFIX))
    marks = json.loads(line[len(PHASES_PREFIX):]) | {"t_submit": t_submit, "t_submitted": t_submitted, "t_done": t_done}
    return marks, out.stdout + out.stderr + log


def phases(marks: dict) -> dict:
    """Seconds per phase, the fixed start-up (submit -> first step) and the steady step rate."""
    steps = int(marks["steps"])
    rows = {name: round(marks[b] - marks[a], 2) for name, a, b in PHASES if a in marks and b in marks}
    return {"phases_s": rows,
            "inside the step loop_s": {k[2:]: round(v, 2) for k, v in marks.items() if k.startswith("s_")},
            "total_s": round(marks["t_done"] - marks["t_submit"], 2),
            "startup_submit_to_first_step_s": round(marks["t_first_step"] - marks["t_submit"], 2),
            "client_steady_steps_per_s": round((steps - 1) / (marks["t_last_step"] - marks["t_first_step"]), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=default_base_spec())
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--repeats", type=int, default=1, help="plain/client pairs, alternating")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the shared machine; and what Ray gives a 1-CPU worker (OMP_NUM_THREADS=1)

    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="client-profile-") as tmp, LocalCluster(num_cpus=2, cwd=REPO) as cluster:
        work = Path(tmp)
        subprocess.run([str(VENV_BIN / "python"), "jobs/start_coordinator.py", "--base-model", args.base,
                        "--state-dir", str(work / "state"), "--address", cluster.address],
                       cwd=REPO, env=cluster.env, check=True, capture_output=True)
        for i in range(args.repeats):
            plain = plain_rate(args.base, args.steps, args.batch_size)
            marks, log = client_job(cluster, work, f"profile-{i}-{int(time.time())}", args.steps, args.batch_size)
            run = phases(marks | {"steps": args.steps})
            run |= {"plain_steady_steps_per_s": round(plain, 3),
                    "step_rate_ratio_client_over_plain": round(run["client_steady_steps_per_s"] / plain, 3),
                    "load_avg_1min": os.getloadavg()[0]}
            runs.append(run)
            print(json.dumps(run, indent=1), flush=True)
        (work / "last_job.log").write_text(log)
        print(log[-6000:], flush=True)
    ratio = statistics.median(r["step_rate_ratio_client_over_plain"] for r in runs)
    emit({"benchmark": "client_profile", "base": args.base, "steps": args.steps, "batch_size": args.batch_size,
          "cluster_cpus": 2, "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "runs": runs,
          "median_step_rate_ratio": ratio,
          "median_startup_s": statistics.median(r["startup_submit_to_first_step_s"] for r in runs)})


if __name__ == "__main__":
    main()
