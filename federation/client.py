"""A client's side of the federation: token, slot, training through Ray Train, upload.

Only the artifact's bytes leave the client; images stay on the node that runs the client job.
Ray Data reads them with a `local://` path (read tasks run on this node), and the training
workers are held to the same node by the `ray.io/node-id` label selector, so neither images nor
checkpoints need shared storage.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from blocklora.config import TrainConfig
from blocklora.data import image_files, to_tensor
from federation.protocol import Grant, LiveConcept, Unauthorized
from federation.train_func import ARTIFACT_FILE, train_func

DEFAULT_STORAGE = "~/blocklora-train"  # Ray Train run folders (checkpoints) on the client's node


def load_or_register(coordinator, token_file: str | Path, client_name: str = "") -> str:
    """Reuse the token saved in `token_file`, or register and save a new one there (mode 0600)."""
    path = Path(token_file).expanduser()
    if path.exists():
        token = path.read_text().strip()
        try:
            ray.get(coordinator.whoami.remote(token))
        except Unauthorized:
            raise Unauthorized(f"the token saved in {path} is not valid for this federation (another "
                               "coordinator or state folder?); delete the file to register anew") from None
        return token
    token = ray.get(coordinator.register.remote(client_name)).token
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def _prepare_row(row: dict[str, Any], resolution: int) -> dict[str, Any]:
    """Decoded image -> (3, res, res) float32 in [-1, 1], plus the caption beside it ('' if none)."""
    caption = Path(row["path"]).with_suffix(".txt")
    return {"image": to_tensor(row["image"], resolution).numpy(),
            "caption": caption.read_text().strip() if caption.exists() else ""}


def concept_dataset(images_dir: str | Path, resolution: int) -> ray.data.Dataset:
    """The concept's images as a materialized Ray Dataset, read on this node.

    Materialized here, before the trainers take their CPUs, so read tasks never wait for
    CPUs held by training workers (two clients on a small cluster would otherwise deadlock)."""
    folder = Path(images_dir).expanduser().resolve()
    image_files(folder)  # a clear error now rather than an empty dataset later
    ds = ray.data.read_images(f"local://{folder}", mode="RGB", include_paths=True)
    return ds.map(_prepare_row, fn_kwargs={"resolution": resolution}).materialize()


def train_artifact(grant: Grant, images_dir: str | Path, train: TrainConfig, workers: int = 1,
                   use_gpu: bool = False, storage_path: str | Path = DEFAULT_STORAGE) -> bytes:
    """Train the concept for a reservation (`grant` from `reserve`) and return the artifact's bytes.

    The run is named after the reservation, so a client job re-submitted for the same reservation
    resumes from its latest checkpoint under `storage_path` (Ray Train restores a run of the same
    name), while a new reservation trains from scratch; worker failures retry from checkpoints."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    node = ray.get_runtime_context().get_node_id()
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"base_spec": grant.base_spec, "base_fingerprint": grant.base_fingerprint,  # Ray job edge: JSON
                           "adapter": dataclasses.asdict(grant.adapter), "train": dataclasses.asdict(train),
                           "slot": grant.slot, "name": grant.name, "class_word": grant.class_word},
        datasets={"train": concept_dataset(images_dir, train.resolution)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # a few images: every worker sees all
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               label_selector={"ray.io/node-id": node}),
        run_config=ray.train.RunConfig(
            name=f"{grant.name}-slot{grant.slot}-{grant.reservation_id}",
            storage_path=str(Path(storage_path).expanduser().resolve()),
            failure_config=ray.train.FailureConfig(max_failures=2)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        return (Path(folder) / ARTIFACT_FILE).read_bytes()


def train_and_submit(coordinator, token: str, images_dir: str | Path, name: str, class_word: str,
                     train: TrainConfig, workers: int = 1, use_gpu: bool = False,
                     storage_path: str | Path = DEFAULT_STORAGE) -> LiveConcept:
    """Reserve a slot, train for it at the base's resolution, submit: the live concept's record."""
    grant: Grant = ray.get(coordinator.reserve.remote(token, name, class_word))
    print(f"reserved slot {grant.slot} for {name!r} (trigger {' '.join(grant.triggers)}); "
          f"training {train.steps} steps on {workers} worker(s)", flush=True)
    train = dataclasses.replace(train, resolution=grant.resolution)
    data = train_artifact(grant, images_dir, train, workers, use_gpu, storage_path)
    print(f"uploading {len(data):,} bytes", flush=True)
    return ray.get(coordinator.submit.remote(token, data))
