"""Starting a federation on a test cluster, shared by the Ray/HTTP test modules: the operator's way
(the coordinator via jobs/start_coordinator.py, the Serve app via jobs/serve_up.py), or in-process
with the same library calls and none of the scripts' start-up time; and teardown."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from PIL import Image

import blocklora
import federation
import serve as serve_pkg
from blocklora.config import AdapterConfig, FederationConfig
from conftest import REPO
from federation import coordinator
from federation.auth import token_hash
from serve.app import AppArgs, build

CODE = [str(Path(m.__file__).parent) for m in (blocklora, federation, serve_pkg)]  # shipped to the workers


def start_coordinator(head, state_dir: Path, namespace: str, name: str, adapter: AdapterConfig,
                      admin_token: str) -> ray.actor.ActorHandle:
    """Run the real start script, then find the actor by name as every other part does (needs ray.init)."""
    subprocess.run([sys.executable, "jobs/start_coordinator.py", "--base-model", "tiny", "--slots",
                    str(adapter.num_slots), "--rank", str(adapter.rank), "--state-dir", str(state_dir),
                    "--address", head.address, "--namespace", namespace, "--name", name],
                   cwd=REPO, env={**head.env, "BLOCKLORA_ADMIN_TOKEN": admin_token}, check=True, timeout=180)
    return coordinator.get(name, namespace)


def serve_up(head, port: int, namespace: str, name: str, api_key_file: Path | None = None,
             flags: tuple[str, ...] = ()) -> httpx.Client:
    """Run jobs/serve_up.py against the coordinator `name` (with `flags`, e.g. --dtype); an HTTP
    client for it on 127.0.0.1."""
    extra = ["--api-key-file", str(api_key_file)] if api_key_file else []
    extra += flags
    subprocess.run([sys.executable, "jobs/serve_up.py", "--address", head.address, "--host", "127.0.0.1",
                    "--port", str(port), "--namespace", namespace, "--coordinator", name, *extra],
                   cwd=REPO, env=head.env, check=True, timeout=300)
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)


def connect(head, namespace: str) -> None:
    """Connect this process to the test cluster, shipping this checkout's code to the workers."""
    ray.init(address=head.address, namespace=namespace, log_to_driver=False, runtime_env={"py_modules": CODE})


def start_in_process(head, state_dir: Path, namespace: str, name: str, adapter: AdapterConfig, admin_token: str,
                     port: int, api_key: str | None = None, replicas: int = 1,
                     num_cpus: float = 1.0) -> tuple[ray.actor.ActorHandle, httpx.Client]:
    """What the two scripts do, from this process (connects it, with the code as py_modules)."""
    from ray import serve
    connect(head, namespace)
    actor = coordinator.start(state_dir, adapter, FederationConfig(), token_hash(admin_token), name, namespace)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(AppArgs(coordinator=name, namespace=namespace, api_key=api_key, replicas=replicas,
                            num_cpus=num_cpus)), name="blocklora",
              route_prefix="/")
    return actor, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)


def pixels(png: bytes) -> np.ndarray:
    """A PNG response body as (H, W, 3) int16, so differences of two images do not wrap."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def stop_app(actor: ray.actor.ActorHandle, app: str = "blocklora") -> None:
    """Delete the Serve app (the proxy stays, on the session's port) and the coordinator."""
    from ray import serve
    serve.delete(app)
    ray.kill(actor, no_restart=True)


def wait_until(check, timeout: float, what: str, every: float = 0.5):
    """Poll `check()` (bounded) until it returns something truthy; exceptions count as not yet."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            out = check()
            if out:
                return out
        except Exception as err:  # noqa: BLE001 - anything means "not yet" while polling
            last = err
        time.sleep(every)
    raise TimeoutError(f"{what} not reached after {timeout:.0f} s (last error: {last!r})")
