"""A client's side of the federation: token, slot, training through Ray Train, upload.

Only the artifact's bytes leave the client; images stay on the node that runs the client job.
The job's own process decodes them into an in-memory Ray Dataset, and the training workers are
held to the same node by the `ray.io/node-id` label selector, so neither images nor checkpoints
need shared storage. This module imports no diffusers: the driver of a client job starts in
seconds, and only the training workers load the model code (`_train_worker`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from blocklora.config import TrainConfig
from blocklora.files.atomic import atomic_write
from blocklora.training.data import load_concept_images
from federation.auth import new_client_token
from federation.errors import Unauthorized
from federation.procfs import argv, parent_pid
from federation.protocol import ARTIFACT_FILE, Grant, LiveConcept

DEFAULT_STORAGE = "~/blocklora-train"  # Ray Train run folders (checkpoints) on the client's node


def job_node_id() -> str:
    """The Ray node this process runs on: where a client job's images are, so its workers go there.

    `get_node_id()` names the node whose raylet the driver connected to, which on a real cluster is
    its own; where several raylets share one host (devtools.local_cluster's multi-node cluster)
    Ray connects every driver to the head's. A job's driver descends from its node's raylet
    (raylet -> JobSupervisor -> driver), so the nearest raylet ancestor names its node; a driver
    started by hand has none, and then the connected node is the answer."""
    pid: int | None = os.getpid()
    while pid is not None and pid > 1:
        args = argv(pid)
        if args and Path(args[0]).name == "raylet":
            return next((a.split("=", 1)[1] for a in args if a.startswith("--node_id=")),
                        ray.get_runtime_context().get_node_id())
        pid = parent_pid(pid)
    return ray.get_runtime_context().get_node_id()


def job_init_args(verbose: bool = False) -> dict[str, Any]:
    """`ray.init` arguments for a client job's driver, for every process the job starts.

    - nice 0: Ray starts its workers at nice 15, but a client's training is the job's whole point
      and should get the CPU share `blocklora train` gets on the same node (on a busy node a nice-15
      process gets a few percent of a core);
    - prints go straight to stdout (Ray Train would route them through its logger, which showed
      each progress line twice), so the job's output is the training's progress;
    - no PreemptionWatcher: Ray Train starts one more actor process per run to poll whether the node
      is being drained (spot reclaim); a client's node is its own, drained by nobody (cluster.yaml's
      autoscaler only removes idle nodes), and the process costs a core for a while at start-up;
    - unless `verbose`: Ray's own output (dataset progress bars and logs, Train's INFO lines,
      deprecation warnings, diffusers' loading bars) stays off the terminal; Ray's own Python lines are
      still in the session's log files. The C++ core of the job's workers logs only FATAL lines: at
      ERROR it told every Train run that an actor restart "will fail" (ray-project/ray#53727), about
      the PreemptionWatcher above; a real failure still reaches the job as a Python exception."""
    env = {"RAY_worker_niceness": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    if not verbose:
        env |= {"RAY_DATA_LOG_LEVEL": "ERROR", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning", "RAY_BACKEND_LOG_LEVEL": "fatal"}
        ray.data.DataContext.get_current().enable_progress_bars = False
    return {"runtime_env": {"env_vars": env}, "logging_level": "INFO" if verbose else "WARNING"}


def load_or_register(coordinator, token_file: str | Path, invitation: str | None = None) -> str:
    """Reuse the token saved in `token_file`, or register with `invitation` and save a new one
    there (mode 0600). Jobs that share a token file take turns under a lock on it, so two first-time
    jobs register once: the second reads the token the first saved."""
    path = Path(token_file).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if path.exists():
            token = path.read_text().strip()
            try:
                ray.get(coordinator.whoami.remote(token))
            except Unauthorized:
                raise Unauthorized(f"the token saved in {path} is not valid for this federation (another "
                                   "coordinator or state folder?); delete the file to register anew") from None
            return token
        if not invitation:
            raise Unauthorized(f"no token in {path} yet: register with the invitation code the federation's admin "
                               "gave you (--invitation CODE)")
        token = new_client_token()  # drawn here: a retried registration is recognised by its digest
        registration = ray.get(coordinator.register.remote(invitation, token))
        atomic_write(path, token.encode(), 0o600)
        print(f"registered as {registration.name!r} (client {registration.client_id}); token saved in {path}",
              flush=True)
        return token


def slot_line(slot: int, peers: int, names: tuple[str, ...]) -> str:
    """What a user needs to know about a slot: which concepts it cannot be merged with."""
    if not peers:
        return f"slot {slot} holds no other live concept: it can be merged with any set that leaves slot {slot} free"
    shown = ", ".join(repr(n) for n in names) + (f" and {peers - len(names)} more" if peers > len(names) else "")
    return (f"slot {slot} is shared with {peers} other live concept(s) ({shown}): a picture merges at most one of "
            f"them with it (reserve with --with NAME ... to stay apart from the ones you will combine)")


def concept_dataset(images_dir: str | Path, resolution: int) -> ray.data.Dataset:
    """The concept's images, decoded by this process, as an in-memory Ray Dataset.

    A client brings a handful of pictures: decoding them here takes milliseconds, whereas a
    `read_images` pipeline starts read and map tasks, each a new worker process importing torch,
    which cost tens of seconds per client on a small machine (docs/results/client-job.md). In memory
    the dataset needs no task at all, and no CPU the training workers hold."""
    images, captions = load_concept_images(Path(images_dir).expanduser(), resolution)
    return ray.data.from_items([{"image": im.numpy(), "caption": c or ""} for im, c in zip(images, captions)])


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry in each worker: imports the model code there, never in the driver."""
    from federation.train_func import train_func

    train_func(config)


def train_artifact(grant: Grant, images_dir: str | Path, train: TrainConfig, workers: int = 1,
                   use_gpu: bool = False, storage_path: str | Path = DEFAULT_STORAGE,
                   marks: dict[str, float] | None = None, verbose: bool = False,
                   report_to: tuple[str, str] | None = None) -> bytes:
    """Train the concept for a reservation (`grant` from `reserve`) and return the artifact's bytes.

    The run is named after the reservation, so a client job re-submitted for the same reservation
    resumes from its latest checkpoint under `storage_path` (Ray Train restores a run of the same
    name), while a new reservation trains from scratch; worker failures retry from checkpoints.
    `report_to` (coordinator name, namespace): rank 0 tells that coordinator its step and ETA as
    often as it prints them, so listings (and the page) show how far the training is."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    marks = {} if marks is None else marks
    node = job_node_id()
    print(f"training on node {node[:12]}… ({workers} Ray Train worker(s) pinned there)", flush=True)
    marks["t_data_start"] = time.time()
    dataset = concept_dataset(images_dir, train.resolution)
    marks["t_data_read"] = time.time()
    trainer = TorchTrainer(
        _train_worker,
        # the Ray job's edge: JSON
        train_loop_config={"base_spec": grant.base_spec, "base_fingerprint": grant.base_fingerprint,
                           "adapter": dataclasses.asdict(grant.adapter), "train": dataclasses.asdict(train),
                           "slot": grant.slot, "name": grant.name, "class_word": grant.class_word,
                           "ray_log_level": "INFO" if verbose else "WARNING",
                           "progress": None if report_to is None else {
                               "coordinator": report_to[0], "namespace": report_to[1],
                               "reservation_id": grant.reservation_id}},
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # a few images: every worker sees all
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               label_selector={"ray.io/node-id": node}),
        run_config=ray.train.RunConfig(
            name=f"{grant.name}-slot{grant.slot}-{grant.reservation_id}",
            storage_path=str(Path(storage_path).expanduser().resolve()),
            failure_config=ray.train.FailureConfig(max_failures=2),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "ERROR")),  # the controller's
    )
    result = trainer.fit()
    marks["t_fit_returned"] = time.time()
    marks |= {k: v for k, v in result.metrics.items() if k.startswith(("t_", "s_"))}
    with result.checkpoint.as_directory() as folder:
        return (Path(folder) / ARTIFACT_FILE).read_bytes()


def train_and_submit(coordinator, token: str, images_dir: str | Path, name: str, class_word: str,
                     train: TrainConfig, workers: int = 1, use_gpu: bool = False,
                     storage_path: str | Path = DEFAULT_STORAGE, marks: dict[str, float] | None = None,
                     verbose: bool = False, with_: tuple[str, ...] = (),
                     report_to: tuple[str, str] | None = None) -> LiveConcept:
    """Reserve a slot (apart from the concepts in `with_`), train for it at the base's resolution,
    submit: the live concept's record. Each call carries a request id, so a retry Ray makes after a
    coordinator restart gets the first answer. `report_to`: the coordinator's (name, namespace), for
    step reports (see `train_artifact`)."""
    marks = {} if marks is None else marks
    grant: Grant = ray.get(coordinator.reserve.remote(token, name, class_word, tuple(with_), uuid.uuid4().hex))
    marks["t_reserved"] = time.time()
    print(f"reserved slot {grant.slot} for {name!r} (trigger {' '.join(grant.triggers)}); "
          f"training {train.steps} steps on {workers} worker(s)", flush=True)
    print(slot_line(grant.slot, grant.slot_peers, grant.peer_names), flush=True)
    train = dataclasses.replace(train, resolution=grant.resolution)
    data = train_artifact(grant, images_dir, train, workers, use_gpu, storage_path, marks, verbose, report_to)
    print(f"uploading {len(data):,} bytes", flush=True)
    marks["t_upload_start"] = time.time()
    live = ray.get(coordinator.submit.remote(token, data, uuid.uuid4().hex))
    marks["t_uploaded"] = time.time()
    return live
