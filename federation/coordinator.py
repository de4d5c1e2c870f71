"""The coordinator: a named, detached Ray actor that is a thin, persistent shell around `Registry`.

It is pinned to the node that started it (its state folder is that node's disk), restarts on
failure (`max_restarts`) and rebuilds itself from the state folder in `__init__`, so a restarted
or brand-new coordinator on the same folder has every live concept and every token back.
Serve replicas follow it with `state(since_version)`: artifacts travel through the object store
(one `ray.put` per concept, cached), never through files.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import blocklora
import federation
from blocklora.config import AdapterConfig, FederationConfig, from_dict
from federation.protocol import FederationInfo, Grant, HeldSlot, LiveConcept, LiveSet, Principal, Registration, Removed
from federation.store import StateStore

if TYPE_CHECKING:
    import torch

DEFAULT_NAME = "blocklora-coordinator"
DEFAULT_NAMESPACE = "blocklora"
# how long the Serve app's replicas wait for the coordinator's name: the app may be started beside
# jobs/start_coordinator.py (the main job does), which reads the base before it creates the actor
START_WAIT_S = 120.0


class Coordinator:
    """Every public method is a remote call; errors are `federation.registry.FederationError`s."""

    def __init__(self, state_dir: str, space: dict[str, Any], config: dict[str, Any],
                 admin_token_sha256: str | None, dtype: str = "float32") -> None:
        """`space` is `SlotSpace.to_dict()` of the federation's base, read by `start`: the actor never
        loads the base, so neither its first start nor a restart after a crash imports diffusers."""
        # imported here, in the actor's process: a client's driver that only looks the actor up by
        # name (`get`) then starts without torch
        from blocklora.method.slots import SlotSpace
        from blocklora.pipeline.precision import dtype_of
        from federation.registry import Registry

        self.registry = Registry(SlotSpace.from_dict(space), from_dict(FederationConfig, config),
                                 StateStore(state_dir), admin_token_sha256, dtype=dtype_of(dtype))
        self._refs: dict[str, ray.ObjectRef] = {}  # artifact sha256 -> its bytes in the object store

    def info(self) -> FederationInfo:
        return self.registry.info()

    def version(self) -> int:
        return self.registry.version

    def register(self, client_name: str = "") -> Registration:
        return self.registry.register(client_name)

    def whoami(self, token: str) -> Principal:
        return self.registry.whoami(token)

    def reserve(self, token: str, name: str, class_word: str) -> Grant:
        return self.registry.reserve(token, name, class_word)

    def submit(self, token: str, data: bytes) -> LiveConcept:
        return self.registry.submit(token, data)

    def remove(self, token: str, name: str) -> Removed:
        return self.registry.remove(token, name)

    def list_concepts(self) -> list[LiveConcept | HeldSlot]:
        return self.registry.list_concepts()

    def state(self, since_version: int = -1) -> LiveSet:
        """The whole live set (always complete) and whether it changed since `since_version`."""
        version, live = self.registry.live()
        self._refs = {c.sha256: self._refs.get(c.sha256) or ray.put(data) for c, data in live.values()}
        return LiveSet(version, version != since_version, {n: c for n, (c, _) in live.items()},
                       {n: self._refs[c.sha256] for n, (c, _) in live.items()})

    def merged_residual(self) -> dict[str, torch.Tensor]:
        return self.registry.merged_residual()

    def merged_lora(self, rule: str = "sum") -> tuple[int, bytes]:
        return self.registry.merged_lora(rule)


def connect(address: str = "auto", namespace: str = DEFAULT_NAMESPACE) -> None:
    """`ray.init` for a driver that starts the coordinator: blocklora and federation travel as
    `py_modules` of this job, which the detached actor keeps, so it can be restarted (and import
    them) after this driver has exited, on a cluster that has no copy of the repo."""
    ray.init(address=address, namespace=namespace, log_to_driver=False,
             runtime_env={"py_modules": [str(Path(m.__file__).parent) for m in (blocklora, federation)]})


def start(state_dir: str | Path, adapter: AdapterConfig, config: FederationConfig,
          admin_token_sha256: str | None, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE,
          max_restarts: int = -1, max_task_retries: int = 3, dtype: str = "float32") -> ray.actor.ActorHandle:
    """Create the detached coordinator on this driver's node and wait until it has loaded its state;
    `dtype` (a --dtype name) is its base's, and so the merged LoRA's it serves.

    Needs `connect` first (the code the actor runs comes with it); refuses to start a second
    coordinator under `name`. Reads what fits the base here (`SlotSpace`: shapes, fingerprint,
    resolution), once; the actor gets it as JSON and never imports the model code.
    """
    from blocklora.method.slots import SlotSpace
    from blocklora.pipeline.base import load_base  # here, not at the top: `get` stays free of diffusers

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        pass
    else:
        raise RuntimeError(f"a coordinator named {name!r} already runs in namespace {namespace!r}; stop it "
                           "first (python jobs/stop_coordinator.py) or pick another --name")
    space = SlotSpace.of(load_base(config.base, device="cpu"), adapter)  # the fingerprint is dtype-independent
    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(Coordinator).options(
        name=name, namespace=namespace, lifetime="detached", num_cpus=0,
        max_restarts=max_restarts, max_task_retries=max_task_retries,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(str(Path(state_dir).expanduser().resolve()), space.to_dict(), dataclasses.asdict(config),
             admin_token_sha256, dtype)
    ray.get(actor.info.remote())  # surfaces a failed __init__ (a state folder of another base or shape) here
    return actor


def get(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, wait_s: float = 0.0) -> ray.actor.ActorHandle:
    """The running coordinator, found by name; a clear error when there is none after `wait_s` seconds
    (a Serve replica started beside `jobs/start_coordinator.py` waits for it: see START_WAIT_S)."""
    if not ray.is_initialized():  # ray.get_actor would quietly start a new, empty local cluster
        raise RuntimeError("not connected to a Ray cluster: call ray.init(address=...) first")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    waited = f" after waiting {wait_s:.0f} s" if wait_s else ""
    raise RuntimeError(f"no coordinator named {name!r} in Ray namespace {namespace!r}{waited}; start one with "
                       "python jobs/start_coordinator.py --state-dir DIR (same --namespace/--name)")
