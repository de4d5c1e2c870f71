"""Where a client job's time goes: its phases, from wall-clock marks (time.time(), comparable across
one node's processes) that the job collects as it runs and prints as one line at its end."""

from __future__ import annotations

import json

# (phase, from mark, to mark). The driver sets its marks in jobs/client_train.py and federation/client.py,
# the training worker in federation/train_func.py; t_submit, t_submitted and t_done are for whoever
# submits the job to add. The job prints its marks as one line (MARKS_LINE + JSON) at its end; the main
# job's report and benchmarks/client_profile.py turn them into seconds with `phase_seconds`.
MARKS_LINE = "client phase marks "
PHASES = (
    # The CLI can still be exiting when the driver already runs, so these two overlap (both from t_submit):
    # "t_submitted -> t_driver_start" came out negative whenever the driver won that race.
    ("submit CLI: start, package + upload the working dir, exit", "t_submit", "t_submitted"),
    ("submit -> driver process running (supervisor, unpack code; overlaps the CLI)", "t_submit", "t_driver_start"),
    ("driver imports", "t_driver_start", "t_imported"),
    ("connect, register, reserve", "t_imported", "t_reserved"),
    ("read the pictures into a Ray Dataset", "t_data_start", "t_data_read"),
    ("worker start: Train controller + worker process + imports", "t_data_read", "t_worker_start"),
    ("base load in the worker", "t_worker_start", "t_base_loaded"),
    ("dataset shard", "t_base_loaded", "t_shard_read"),
    ("class pictures, quiet penalty's bank, trainer set-up", "t_shard_read", "t_loop_start"),
    ("first step", "t_loop_start", "t_first_step"),
    ("steps 2..N (compute, reporting, checkpoints)", "t_first_step", "t_last_step"),
    ("last checkpoint + training teardown", "t_last_step", "t_fit_returned"),
    ("upload", "t_upload_start", "t_uploaded"),
    ("driver exit, job marked done", "t_uploaded", "t_done"),
)


def phase_seconds(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase (those whose two marks are there), plus the time spent inside the step
    loop reporting to Ray Train and checkpointing (`s_` sums of the worker)."""
    rows = {name: round(marks[b] - marks[a], 2) for name, a, b in PHASES if a in marks and b in marks}
    return rows | {f"of which {k[2:]}ing": round(v, 2) for k, v in marks.items() if k.startswith("s_")}


def marks_from_log(log: str) -> dict[str, float] | None:
    """The marks a client job printed at its end (None if it did not get there)."""
    line = next((ln for ln in log.splitlines() if ln.startswith(MARKS_LINE)), None)
    return json.loads(line[len(MARKS_LINE):]) if line else None
