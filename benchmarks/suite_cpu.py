"""Where the test suite's time goes: a pytest plugin that records, per test phase (setup, call,
teardown), its wall time and the machine's busy CPU seconds (`/proc/stat`, every process: Ray's daemons
and workers, subprocesses, prerun jobs), then prints the whole run's and each module's figures.

    bash run.sh test -p benchmarks.suite_cpu            # JSON to outputs/suite_cpu.json ($SUITE_CPU_OUT)

On two cores a suite at `cpu_s / 2` seconds would keep both busy all the time: that is its floor for
today's work, and `busy` (cpu_s / (2 x wall_s)) says how close the run came to it (docs/results/suite.md).
Linux only; read nothing else into CPU seconds of a machine shared with other work.
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import pytest

TICKS = os.sysconf("SC_CLK_TCK")
ROWS: list[tuple[str, str, float, float]] = []  # (test id, phase, wall s, busy CPU s of the machine)


def busy_cpu_s() -> float:
    """CPU seconds the machine has spent running anything (niced work too), over all cores."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / TICKS


def _timed(phase: str):
    @pytest.hookimpl(wrapper=True)
    def hook(item: pytest.Item):
        wall, cpu = time.monotonic(), busy_cpu_s()
        try:
            return (yield)
        finally:
            ROWS.append((item.nodeid, phase, time.monotonic() - wall, busy_cpu_s() - cpu))
    return hook


pytest_runtest_setup, pytest_runtest_call, pytest_runtest_teardown = map(_timed, ("setup", "call", "teardown"))


def summary(rows: list[tuple[str, str, float, float]], cores: int) -> dict:
    wall, cpu = collections.Counter(), collections.Counter()
    for test, _, w, c in rows:
        module = test.split("::")[0]
        wall[module] += w
        cpu[module] += c
    total_wall, total_cpu = sum(wall.values()), sum(cpu.values())
    return {"cores": cores, "wall_s": round(total_wall, 1), "cpu_s": round(total_cpu, 1),
            "busy": round(total_cpu / (cores * total_wall), 3), "floor_s": round(total_cpu / cores, 1),
            "modules": {m: {"wall_s": round(w, 1), "cpu_s": round(cpu[m], 1)} for m, w in wall.most_common()}}


def pytest_terminal_summary(terminalreporter) -> None:
    result = summary(ROWS, os.cpu_count() or 1)
    out = Path(os.environ.get("SUITE_CPU_OUT", "outputs/suite_cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "phases": ROWS}, indent=1))
    terminalreporter.write_line(f"suite_cpu: {result['wall_s']} s of tests, {result['cpu_s']} s of CPU, "
                                f"{result['busy']:.0%} of {result['cores']} cores busy "
                                f"(floor {result['floor_s']} s); {out}")
    terminalreporter.write_line(json.dumps({k: v for k, v in result.items() if k != "modules"}))
