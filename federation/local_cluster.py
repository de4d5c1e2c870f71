"""A single-node Ray cluster on 127.0.0.1 that this process starts, owns and stops.

Started the way an operator would (`ray start --head --block`), with every port chosen free so it
can run beside other clusters on the machine, optionally with Ray token authentication, and in its
own process group so stopping it ends exactly its processes (never `ray stop`, which would also
stop everyone else's).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`address` for ray.init / --address, `dashboard_url` for `ray job submit`, `env` for children."""

    def __init__(self, num_cpus: int = 2, auth_token_path: Path | None = None, cwd: Path | None = None) -> None:
        self.port, self.dashboard_port = free_port(), free_port()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths are length-limited
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ADDRESS": self.address}  # "auto" inside this cluster means this cluster
        if auth_token_path is not None:
            if not auth_token_path.exists():
                auth_token_path.parent.mkdir(parents=True, exist_ok=True)
                auth_token_path.write_text(secrets.token_hex(32))
                auth_token_path.chmod(0o600)
            self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(auth_token_path)}
        else:
            self.auth_env = {"RAY_AUTH_MODE": "disabled"}
        self.env |= self.auth_env
        self.log = self.temp_dir / "ray-start.log"
        self.num_cpus, self.cwd = num_cpus, cwd
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "LocalCluster":
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={self.port}", f"--num-cpus={self.num_cpus}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                         start_new_session=True)
        self._wait_jobs_api(timeout)
        return self

    def _wait_jobs_api(self, timeout: float) -> None:
        """Up means the job API answers (401 counts: with token auth the agent is there)."""
        deadline = time.monotonic() + timeout
        url = f"{self.dashboard_url}/api/version"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError as err:
                if err.code == 401:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Ray dashboard at {url} not up after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """End this cluster's process group: graceful first, then whatever is left."""
        if self.proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
