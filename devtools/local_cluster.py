"""A Ray cluster on 127.0.0.1 that this process starts, owns and stops: one head, and optionally
worker nodes shaped like cluster.yaml's node types (several raylets on one machine).

Started the way an operator would (`ray start --head --block`, `ray start --address=... --block`),
with every port chosen free so it can run beside other clusters on the machine, optionally with Ray
token authentication, and each node in its own process group: stopping the cluster ends exactly its
processes (never `ray stop`, which would also stop everyone else's), and killing one node's group is
what losing that machine looks like to Ray (its raylet and every worker on it gone at once).
"""

from __future__ import annotations

import contextlib
import json
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

import yaml

from federation.procfs import argv, descendants

VENV_BIN = Path(sys.executable).parent
CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
# a worker node's object store: Ray's default (30% of RAM) for each of several raylets would promise
# this machine's memory several times over; concept artifacts and a few images need far less
NODE_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `ray start` for a worker node on this machine. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is what keeps Ray
# on loopback (every address it resolves for "this host" is 127.0.0.1), but it also makes `ray start
# --address` refuse to join a head. Setting it to 1 would resolve 127.0.0.1 to the machine's network
# IP; so the flag is lifted for that one check in `ray start`'s own module, and nowhere else.
_JOIN = ("import sys, types, ray._private.ray_constants as c, ray.scripts.scripts as s; "
         "s.ray_constants = types.SimpleNamespace(**{**vars(c), 'ENABLE_RAY_CLUSTER': True}); "
         "sys.argv = ['ray', *sys.argv[1:]]; s.main()")


def node_types(path: Path = CLUSTER_YAML) -> dict[str, dict[str, float]]:
    """cluster.yaml's `available_node_types`: node type -> its custom resources (e.g. `client_node`).

    CPU and GPU are left out: a local cluster advertises what this machine can hold, not a cloud
    instance's counts; the custom resources are what placement asks for, so they are kept exactly."""
    types = yaml.safe_load(path.read_text())["available_node_types"]
    return {name: {k: float(v) for k, v in t.get("resources", {}).items() if k not in ("CPU", "GPU")}
            for name, t in types.items()}


def _agent_ports() -> list[str]:
    """Free ports for a node's agents: their defaults (e.g. 52365) would clash between raylets on one host."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


class LocalCluster:
    """`address` for ray.init / --address, `dashboard_url` for `ray job submit`, `env` for children.

    `resources` are the head's custom resources; `add_nodes` starts worker nodes (`node_ids` maps
    each node's name to its Ray node id) and `kill_node` takes one away as a machine failure would."""

    def __init__(self, num_cpus: int = 2, auth_token_path: Path | None = None, cwd: Path | None = None,
                 resources: dict[str, float] | None = None) -> None:
        self.port, self.dashboard_port = free_port(), free_port()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths are length-limited
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ADDRESS": self.address,  # "auto" inside this cluster means this cluster
                    # the GCS declares a node dead after 5 failed pings; every 1 s instead of 3 s here, where
                    # every node is on this host: a killed node's actors and jobs are rescheduled 10 s sooner
                    "RAY_health_check_period_ms": "1000"}
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
        self.num_cpus, self.cwd, self.resources = num_cpus, cwd, resources or {}
        self.proc: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}  # worker nodes by name, each its own process group
        self.node_ids: dict[str, str] = {}

    def start(self, timeout: float = 180) -> "LocalCluster":
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={self.port}", f"--num-cpus={self.num_cpus}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", *_agent_ports(),
               f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        self.proc = self._popen(cmd, self.log)
        self._wait_jobs_api(timeout)
        return self

    def _popen(self, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:  # a new session: the node's own process group, killed as one
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                    start_new_session=True)

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

    def add_nodes(self, nodes: dict[str, dict[str, float]], num_cpus: int = 1, timeout: float = 120) -> dict[str, str]:
        """Start worker nodes (name -> custom resources), one after another; their Ray node ids.

        One at a time: `ray start` gives a node's raylet a fixed 30 s to register with the GCS, and on two
        cores four raylets with their agents starting at once have kept the GCS from answering in time.
        Each has its own temp dir (short: socket paths are length-limited) for its sockets and logs."""
        taken = sorted(set(nodes) & set(self.node_ids))
        if taken:
            raise ValueError(f"node name(s) {taken} were already used in this cluster")
        for name, resources in nodes.items():
            temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir=self.temp_dir))
            cmd = [sys.executable, "-c", _JOIN, "start", f"--address={self.address}", "--block",
                   "--node-ip-address=127.0.0.1", f"--node-name={name}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                   f"--resources={json.dumps(resources)}", f"--object-store-memory={NODE_OBJECT_STORE_BYTES}",
                   *_agent_ports(), f"--temp-dir={temp_dir}", "--disable-usage-stats"]
            self.nodes[name] = self._popen(cmd, self.temp_dir / f"ray-start-{name}.log")
            self.node_ids[name] = self._wait_node(name, timeout)
        return {name: self.node_ids[name] for name in nodes}

    def _wait_node(self, name: str, timeout: float) -> str:
        from ray.util.state import list_nodes  # imported here: a head-only cluster never needs the state API

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nodes[name].poll() is not None:
                raise RuntimeError(f"`ray start` of node {name!r} exited with {self.nodes[name].returncode}:\n"
                                   f"{(self.temp_dir / f'ray-start-{name}.log').read_text()[-3000:]}")
            try:
                alive = list_nodes(address=self.dashboard_url,
                                   filters=[("node_name", "=", name), ("state", "=", "ALIVE")],
                                   raise_on_missing_output=False)
            except Exception:  # noqa: BLE001 - the state API answers errors while the node registers
                alive = []
            if alive:
                return alive[0].node_id
            time.sleep(0.5)
        raise TimeoutError(f"node {name!r} did not join the cluster at {self.address} within {timeout:.0f} s")

    def job_log(self, submission_id: str) -> str:
        """The driver log of job `submission_id`, from the node that ran it. Ray writes it there; the
        dashboard finds a node's logs by IP, so where every node is 127.0.0.1 `ray job logs` reads
        the head's copy, which holds only the job's first line when the job ran on a worker node."""
        logs = sorted(self.temp_dir.glob(f"**/session_*/logs/job-driver-{submission_id}.log"),
                      key=lambda p: p.stat().st_size)
        return logs[-1].read_text(errors="replace") if logs else ""

    def kill_node(self, name: str) -> None:
        """SIGKILL everything the node runs, as when its machine is lost: its process group (`ray start`,
        raylet, agents) and every process descended from it, which includes the workers and job drivers
        that Ray puts in process groups of their own."""
        proc = self.nodes.pop(name)
        doomed = descendants(proc.pid)
        _end_group(proc, (signal.SIGKILL,))
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float = 30) -> None:
        """End the worker nodes (SIGKILL: they hold no state), then the head in Ray's own order: SIGTERM
        to the raylet, which ends its workers and signs off with the GCS while the GCS is still there
        (about a second; against a GCS already gone it retries for some 10 s), then to the rest of the
        group, then SIGKILL for whatever is left once the GCS has exited or `grace_s` has passed.
        Waiting for these two, not for `ray start --block` itself, is what keeps a stop short: that
        process stays blocked on the autoscaler's monitor for as long as it is given."""
        for name in list(self.nodes):
            self.kill_node(name)
        if self.proc is not None:
            deadline = time.monotonic() + grace_s
            for pid in _daemons(self.proc.pid, "raylet"):
                with contextlib.suppress(ProcessLookupError):  # it may end between listing and signal
                    os.kill(pid, signal.SIGTERM)
            _wait_gone(self.proc.pid, "raylet", deadline)
            _signal_group(self.proc, signal.SIGTERM)
            _wait_gone(self.proc.pid, "gcs_server", deadline)
            _end_group(self.proc, (signal.SIGKILL,))
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> bool:
    """Send `sig` to the process group `proc` leads (all of it: a leader that has exited may leave
    members behind); False when the group is gone."""
    try:
        os.killpg(proc.pid, sig)
        return True
    except ProcessLookupError:
        return False


def _end_group(proc: subprocess.Popen, signals: tuple[signal.Signals, ...], wait_s: float = 30) -> None:
    """Send each signal in turn to the process group `proc` leads, waiting up to `wait_s` for the
    leader after each."""
    for sig in signals:
        if not _signal_group(proc, sig):
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass


def _daemons(leader: int, name: str) -> list[int]:
    """The living processes below `leader` whose program is `name` (a zombie has no command line)."""
    found = []
    for pid in descendants(leader):
        cmd = argv(pid)
        if cmd and Path(cmd[0]).name == name:
            found.append(pid)
    return found


def _wait_gone(leader: int, name: str, deadline: float) -> None:
    """Poll (bounded by `deadline`) until no process `name` lives below `leader`."""
    while _daemons(leader, name) and time.monotonic() < deadline:
        time.sleep(0.2)


def shaped_like_cluster_yaml(workers: dict[str, int], cwd: Path | None = None, num_cpus: int = 1,
                             path: Path = CLUSTER_YAML, timeout: float = 180) -> LocalCluster:
    """A started cluster with cluster.yaml's head and `workers` (node type -> count) worker nodes,
    named `<type>-<i>`, each with its type's custom resources and `num_cpus` CPUs (what this machine
    holds, not the cloud's). On a failure to start, what did start is stopped."""
    types = node_types(path)
    unknown = sorted(set(workers) - set(types))
    if unknown:
        raise ValueError(f"node type(s) {unknown} are not in {path.name}; it declares {sorted(types)}")
    head_type = yaml.safe_load(path.read_text())["head_node_type"]
    cluster = LocalCluster(num_cpus=num_cpus, cwd=cwd, resources=types[head_type])
    try:
        cluster.start(timeout)
        cluster.add_nodes({f"{kind}-{i}": types[kind] for kind, count in workers.items() for i in range(count)},
                          num_cpus, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
