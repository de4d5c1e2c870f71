"""Subprocess work that a test only reads, run at idle priority while the rest of the suite waits on Ray.

The suite is CPU-bound on two cores yet left a quarter to a third of them idle (docs/results/suite.md):
Ray tests wait on health checks, replica restarts, timeouts. A test marked `@pytest.mark.prerun(job=...)` is
split in two: `job(folder, run)` runs its subprocesses (a benchmark in --quick mode, a CLI or demo script)
from the session's start, two jobs at a time, every process of it on one thread in its own session
whose autogroup has the lowest weight (nice 19), so it takes only CPU that the other tests leave idle;
the test itself runs at the end of the session and asserts on what the job returned and wrote. The
commands and the assertions are the same as in a test that runs them itself; only their time moves.
A job is plain code: it may assert on what it ran, and its failure is its test's failure.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

Runner = Callable[..., subprocess.CompletedProcess]  # (argv, cwd=, env=) -> the finished process, output as text
Job = Callable[[Path, Runner], Any]
IDLE_NICE = 19  # the lowest CPU weight a process or an autogroup can have
TIMEOUT_S = 1800  # a job may wait behind busy foreground tests for most of the suite before it runs


def run_now(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The Runner of a test that runs its process itself, at once and at normal priority."""
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _lower_priority(pid: int) -> None:
    """Give process `pid` and its session the lowest CPU weight. With the kernel's autogroups on, the CPU
    is shared between sessions first (Ray's processes, started by `ray start` in a session of their own,
    are one) and a process's nice value only ranks it within its session: so the session is lowered too."""
    os.setpriority(os.PRIO_PROCESS, pid, IDLE_NICE)
    with contextlib.suppress(FileNotFoundError):  # a kernel without autogroups: the nice value above ranks it
        Path(f"/proc/{pid}/autogroup").write_text(str(IDLE_NICE))


class Prerun:
    """The session's prerun jobs: started once each, two at a time, awaited by their tests."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="prerun")
        self._root = Path(tempfile.mkdtemp(prefix="blocklora-prerun-"))
        self._jobs: dict[Job, tuple[concurrent.futures.Future, Path]] = {}
        self._live: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self, job: Job) -> None:
        if job not in self._jobs:
            folder = self._root / job.__name__
            folder.mkdir()
            self._jobs[job] = (self._pool.submit(job, folder, self.run), folder)

    def result(self, job: Job) -> tuple[Any, Path]:
        """What `job` returned and the folder it wrote in (a failed job raises its error here)."""
        future, folder = self._jobs[job]
        return future.result(), folder

    def run(self, argv: list[str], cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)`, at idle priority on one thread."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the test session is over: {argv} was not started")
            proc = subprocess.Popen(argv, cwd=cwd, env={**(env or os.environ), "OMP_NUM_THREADS": "1"},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            self._live.add(proc)
        try:
            _lower_priority(proc.pid)
            out, err = proc.communicate(timeout=TIMEOUT_S)
        finally:
            with self._lock:
                self._live.discard(proc)
            if proc.poll() is None:  # timed out, or the session is ending
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def close(self) -> None:
        """Stop the jobs whose tests did not wait for them (an interrupted session), then remove the folder."""
        with self._lock:
            self._closed = True
            for proc in self._live:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._root, ignore_errors=True)
