"""The suite's prerun jobs (tests/prerun.py): their processes really take only idle CPU, a job's failure
is its test's, and a session that ends early leaves none of their processes behind."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from prerun import IDLE_NICE, Prerun, Runner

PROBE = """import os
from pathlib import Path
group = Path("/proc/self/autogroup")
print(os.getpriority(os.PRIO_PROCESS, 0), os.environ["OMP_NUM_THREADS"], os.getsid(0) == os.getpid(),
      group.read_text().split()[-1] if group.exists() else "none")"""


def priority(folder: Path, run: Runner) -> list[str]:
    done = run([sys.executable, "-c", PROBE])
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.prerun(job=priority)
def test_a_prerun_process_runs_at_idle_priority_on_one_thread_in_its_own_session(prerun):
    (nice, threads, leads_its_session, group_nice), folder = prerun
    assert int(nice) == IDLE_NICE and threads == "1" and leads_its_session == "True"
    assert group_nice in (str(IDLE_NICE), "none")  # "none": a kernel without autogroups
    assert folder.is_dir()


def fails(folder: Path, run: Runner) -> None:
    done = run([sys.executable, "-c", "raise SystemExit('no such concept: ember')"])
    assert done.returncode == 0, done.stderr


def test_a_failed_job_fails_its_test():
    jobs = Prerun()
    try:
        jobs.start(fails)
        with pytest.raises(AssertionError, match="no such concept: ember"):
            jobs.result(fails)
    finally:
        jobs.close()


def test_an_early_end_stops_the_jobs_still_running(tmp_path):
    pid_file = tmp_path / "pid"

    def sleeps(folder: Path, run: Runner) -> None:
        code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
        run([sys.executable, "-c", code])
        run([sys.executable, "-c", "print('the next step of the job')"])  # never started: the session is over

    jobs = Prerun()
    jobs.start(sleeps)
    for _ in range(300):  # up to 30 s for the interpreter to start
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    started = time.monotonic()
    jobs.close()
    assert time.monotonic() - started < 10
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(RuntimeError, match="the test session is over"):
        jobs.result(sleeps)
