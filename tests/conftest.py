"""Shared fixtures. Core fixtures first; the Ray cluster fixtures follow (federation/serve tests)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray >= 2.5x turns token auth on whenever ~/.ray/auth_token exists; the test cluster listens on
# 127.0.0.1 only, so pin the mode for it and for this process alike: same behaviour on every machine.
os.environ["RAY_AUTH_MODE"] = "disabled"

import pytest  # noqa: E402

from blocklora.base import load_base  # noqa: E402


@pytest.fixture
def tiny_base():
    """A fresh embedded tiny base (tests may mutate it: merges, tokens, injected layers)."""
    return load_base("tiny")


# -- a real Ray cluster ------------------------------------------------------------------------------
# One single-node cluster per test session, started the way an operator would (`ray start --head`),
# bound to 127.0.0.1 only. Every port is picked free so it can run beside other clusters on the
# machine, and teardown ends only this cluster's processes (its own process group), never
# `ray stop`, which would also stop everyone else's.

import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RayHead:
    address: str  # GCS address for ray.init(address=...) and `--address` of the jobs/ scripts
    dashboard_url: str  # for `ray job submit --address ...` and the job SDK
    env: dict  # environment for subprocesses that talk to this cluster (venv on PATH, offline hub)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Ray dashboard at {url} not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def ray_head():
    """Start `ray start --head --block` (2 CPUs, dashboard for the job API) and stop it at the end."""
    port, dash = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in job entrypoints
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_ADDRESS": f"127.0.0.1:{port}"}  # "auto" inside this cluster means this cluster, not another one
    log = temp_dir / "ray-start.log"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={port}", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)  # its own process group: ours to end
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", proc, log, timeout=120)
        yield RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env)
    finally:
        import ray
        ray.shutdown()
        for sig in (signal.SIGTERM, signal.SIGKILL):  # graceful first, then whatever is left of the group
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_head) -> str:
    """The GCS address ("127.0.0.1:PORT") of the session's Ray cluster; see `ray_head` for the rest."""
    return ray_head.address


@pytest.fixture(scope="session")
def serve_port(ray_head) -> int:
    """The HTTP port of Serve on the session cluster. Serve's proxy keeps the port it first started
    on for the cluster's life, so every module that runs jobs/serve_up.py must pass this one."""
    return free_port()
