"""Starting a federation on a test cluster, shared by the Ray/HTTP test modules: the operator's way
(the coordinator via jobs/start_coordinator.py, the Serve app via jobs/serve_up.py), or in-process
with the same library calls and none of the scripts' start-up time; and teardown."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray
from PIL import Image

import blocklora
import federation
import serve as serve_pkg
from blocklora.config import AdapterConfig, FederationConfig
from conftest import REPO, VENV_BIN
from core_helpers import write_images
from federation import coordinator
from federation.auth import new_invitation_code, token_hash
from serve.app import AppArgs, build, start_http

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
                     port: int, api_key: str | None = None, replicas: int = 1, num_cpus: float = 1.0,
                     base: str = "tiny", **app: Any) -> tuple[ray.actor.ActorHandle, httpx.Client]:
    """What the two scripts do, from this process (connects it, with the code as py_modules), for a
    federation on `base`; `app`: further AppArgs. One HTTP proxy, on the head: on a multi-node test
    cluster every raylet shares 127.0.0.1, where a proxy per node would fight over the port."""
    from ray import serve
    connect(head, namespace)
    actor = coordinator.start(state_dir, adapter, FederationConfig(base=base), token_hash(admin_token), name, namespace)
    start_http("127.0.0.1", port, proxy_location="HeadOnly")
    serve.run(build(AppArgs(coordinator=name, namespace=namespace, api_key=api_key, replicas=replicas,
                            num_cpus=num_cpus, **app)), name="blocklora", route_prefix="/")
    return actor, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)


def invite(actor, admin_token: str, name: str) -> str:
    """An invitation code for person `name` (what jobs/invite.py prints)."""
    code = new_invitation_code()
    ray.get(actor.invite.remote(admin_token, name, code))
    return code


def submit_client(head, root: Path, name: str, seed: int, namespace: str, coordinator_name: str,
                  train: tuple[str, ...] = ("--steps", "3"), workers: int = 1,
                  submit: tuple[str, ...] = (), invitation: str | None = None) -> subprocess.Popen:
    """`ray job submit` of jobs/client_train.py for concept `name` (3 generated images under `root`,
    its token in root/NAME.token, registered with `invitation` the first time, checkpoints in
    root/train); `submit`: more `ray job submit` flags, e.g. --entrypoint-resources. The process
    streams the job's output and exits with its status."""
    images = write_images(root / f"images-{name}", n=3, seed=seed)
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(REPO),
           *submit, "--", "python", "jobs/client_train.py", "--images", str(images), "--class-word", "dog",
           "--name", name, "--batch-size", "1", "--seed", str(seed), "--workers", str(workers), *train,
           "--token-file", str(root / f"{name}.token"), *(["--invitation", invitation] if invitation else []),
           "--storage-path", str(root / "train"), "--address", head.address, "--namespace", namespace,
           "--coordinator", coordinator_name]
    return subprocess.Popen(cmd, cwd=REPO, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pixels(png: bytes) -> np.ndarray:
    """A PNG response body as (H, W, 3) int16, so differences of two images do not wrap."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def draw(app: httpx.Client, bodies: list[dict], version: int) -> list[np.ndarray]:
    """The picture of each /v1/generate body, each checked to come from federation `version`."""
    images = []
    for body in bodies:
        r = app.post("/v1/generate", json=body)
        assert r.status_code == 200 and int(r.headers["x-blocklora-version"]) == version, r.text
        images.append(pixels(r.content))
    return images


def is_generator(actor) -> bool:
    """A state-API actor record of a generator replica."""
    return "Generator" in (actor.class_name or "")


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
