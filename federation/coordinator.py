"""The coordinator: a named, detached Ray actor that is a thin, persistent shell around `Registry`.

It is pinned to the node that started it (its state folder is that node's disk), restarts on
failure (`max_restarts`) and rebuilds itself from the state folder in `__init__`, so a restarted
or brand-new coordinator on the same folder has every live concept and every token back; the
store's lock keeps a second coordinator off the folder for this one's life. Serve replicas ask it
to `resolve` each request (names -> slots and artifact digests, clashes refused) and fetch the
artifacts they miss with `artifact`: bytes through the object store, never through files.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import blocklora
import federation
from blocklora.config import AdapterConfig, FederationConfig, from_dict
from federation.protocol import (
    Collection,
    ConceptPage,
    ConceptQuery,
    FederationInfo,
    Grant,
    Invitation,
    LiveConcept,
    Mergeable,
    Plan,
    Principal,
    Registration,
    Removed,
)
from federation.records import DEFAULT
from federation.store import StateStore

if TYPE_CHECKING:
    import torch

DEFAULT_NAME = "blocklora-coordinator"
DEFAULT_NAMESPACE = "blocklora"
# how long the Serve app's replicas wait for the coordinator's name: the app may be started beside
# jobs/start_coordinator.py (the main job does), which reads the base before it creates the actor
START_WAIT_S = 120.0


class Coordinator:
    """Every public method is a remote call; errors are `federation.errors.FederationError`s.
    Mutations take a `request_id` (drawn by the caller, the same on a retry): Ray retries a call
    whose actor died (`max_task_retries`), and the retry gets the first call's answer."""

    def __init__(self, state_dir: str, space: dict[str, Any], config: dict[str, Any],
                 admin_token_sha256: str | None, dtype: str = "float32") -> None:
        """`space` is `SlotSpace.to_dict()` of the federation's base, read by `start`: the actor never
        loads the base, so neither its first start nor a restart after a crash imports diffusers."""
        # imported here, in the actor's process: a client's driver that only looks the actor up by
        # name (`get`) then starts without torch
        from blocklora.method.slots import SlotSpace
        from blocklora.pipeline.precision import dtype_of
        from federation.registry import Registry

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        holder = (f"coordinator {ctx.get_actor_name()!r} (namespace {ctx.namespace!r})" if ctx and ctx.get_actor_name()
                  else f"a coordinator process (pid {os.getpid()})")
        self.registry = Registry(SlotSpace.from_dict(space), from_dict(FederationConfig, config),
                                 StateStore(state_dir, holder), admin_token_sha256, dtype=dtype_of(dtype))

    def info(self) -> FederationInfo:
        return self.registry.info()

    def version(self) -> int:
        return self.registry.version

    def invite(self, token: str, name: str, code: str, quota: int | None = None, uses: int = 1,
               ttl_s: float | None = None) -> Invitation:
        return self.registry.invite(token, name, code, quota, uses, ttl_s)

    def register(self, invitation: str, token: str) -> Registration:
        return self.registry.register(invitation, token)

    def whoami(self, token: str) -> Principal:
        return self.registry.whoami(token)

    def reserve(self, token: str, name: str, class_word: str, with_: tuple[str, ...] = (),
                request_id: str | None = None) -> Grant:
        return self.registry.reserve(token, name, class_word, with_, request_id)

    def submit(self, token: str, data: bytes, request_id: str | None = None) -> LiveConcept:
        return self.registry.submit(token, data, request_id)

    def remove(self, token: str, name: str, request_id: str | None = None) -> Removed:
        return self.registry.remove(token, name, request_id)

    def progress(self, name: str, reservation_id: str, step: int, steps: int, eta_s: float | None) -> bool:
        """A training job's step report (fire-and-forget from its rank-0 worker; memory only)."""
        return self.registry.progress(name, reservation_id, step, steps, eta_s)

    def list_concepts(self, query: ConceptQuery = ConceptQuery()) -> ConceptPage:
        return self.registry.list_concepts(query)

    def put_collection(self, token: str, name: str, members: tuple[str, ...],
                       request_id: str | None = None) -> Collection:
        return self.registry.put_collection(token, name, members, request_id)

    def delete_collection(self, token: str, name: str, request_id: str | None = None) -> Collection:
        return self.registry.delete_collection(token, name, request_id)

    def collection(self, name: str) -> Collection:
        return self.registry.collection(name)

    def list_collections(self) -> list[Collection]:
        return self.registry.list_collections()

    def mergeable(self, names: tuple[str, ...]) -> Mergeable:
        return self.registry.mergeable(names)

    def resolve(self, subset: dict[str, float], collection: str | None = None) -> Plan:
        return self.registry.resolve(subset, collection)

    def artifact(self, name: str, sha256: str) -> bytes:
        """One live artifact's bytes, read from the state folder: what a replica's cache fetches."""
        return self.registry.artifact(name, sha256)

    def merged_residual(self, collection: str = DEFAULT) -> dict[str, torch.Tensor]:
        return self.registry.merged_residual(collection)

    def merged_lora(self, rule: str = "sum", collection: str = DEFAULT) -> tuple[int, bytes]:
        return self.registry.merged_lora(rule, collection)


def enrol(actor: ray.actor.ActorHandle, admin_token: str, name: str, quota: int | None = None) -> str:
    """The admin's shortcut for a person who is also on this machine (benchmarks, tests, demos):
    invite `name` and register one client for them; its token."""
    from federation.auth import new_client_token, new_invitation_code

    code, token = new_invitation_code(), new_client_token()
    ray.get(actor.invite.remote(admin_token, name, code, quota))
    ray.get(actor.register.remote(code, token))
    return token


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
