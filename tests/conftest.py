"""Shared fixtures. Core fixtures first; the Ray cluster fixtures follow (federation/serve tests)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The node cache (tokenizer files, the base's class pictures) starts empty for every run of the suite
# and is shared by its tests, its Ray cluster and its jobs (they inherit this environment), as one node's.
os.environ["BLOCKLORA_CACHE"] = tempfile.mkdtemp(prefix="blocklora-test-cache-")
atexit.register(shutil.rmtree, os.environ["BLOCKLORA_CACHE"], True)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray >= 2.5x turns token auth on whenever ~/.ray/auth_token exists; the test cluster listens on
# 127.0.0.1 only, so pin the mode for it and for this process alike: same behaviour on every machine.
os.environ["RAY_AUTH_MODE"] = "disabled"

import pytest  # noqa: E402

from blocklora.pipeline.base import load_base  # noqa: E402

# -- prerun jobs (tests/prerun.py) -------------------------------------------------------------------
# Tests marked `@pytest.mark.prerun(job=...)` run last; their jobs start when collection ends and run at idle
# priority under the tests before them.
from prerun import Prerun  # noqa: E402

PRERUN = pytest.StashKey[Prerun]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "prerun(job=f): the test reads what f(folder, run) did at idle priority")


def _job(item: pytest.Item):
    marker = item.get_closest_marker("prerun")
    return marker.kwargs["job"] if marker else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _job(item) is not None)  # stable: the order within each part is kept


def pytest_collection_finish(session: pytest.Session) -> None:
    jobs = [job for job in map(_job, session.items) if job is not None]
    if jobs and not session.config.option.collectonly:
        prerun = session.config.stash[PRERUN] = Prerun()
        for job in jobs:
            prerun.start(job)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if PRERUN in session.config.stash:
        session.config.stash[PRERUN].close()


@pytest.fixture
def prerun(request: pytest.FixtureRequest):
    """(what the test's prerun job returned, the folder it wrote in)."""
    return request.config.stash[PRERUN].result(_job(request.node))


@pytest.fixture
def tiny_base():
    """A fresh embedded tiny base (tests may mutate it: merges, tokens, injected layers)."""
    return load_base("tiny")


# -- a real Ray cluster ------------------------------------------------------------------------------
# One single-node cluster per test session, started the way an operator would (`ray start --head`),
# bound to 127.0.0.1 only: devtools.local_cluster.LocalCluster, the same class the main job uses.
# Every port is picked free so it can run beside other clusters on the machine, and teardown ends
# only this cluster's processes (its own process group), never `ray stop`, which would also stop
# everyone else's. Token auth is off here (loopback only); tests/test_security.py covers it on.

from pathlib import Path  # noqa: E402

from devtools.local_cluster import VENV_BIN, LocalCluster, free_port  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_head():
    """A started LocalCluster: `.address`, `.dashboard_url` and `.env` for subprocesses. It advertises
    3 CPUs (on however many cores): two concurrent client jobs, one of them data parallel on 2 Ray
    Train workers, then train side by side instead of one waiting out Ray Train's 60 s start timeout."""
    cluster = LocalCluster(num_cpus=3, cwd=REPO).start(timeout=120)
    try:
        yield cluster
    finally:
        import ray
        ray.shutdown()
        cluster.stop()


@pytest.fixture(scope="session")
def ray_cluster(ray_head) -> str:
    """The GCS address ("127.0.0.1:PORT") of the session's Ray cluster; see `ray_head` for the rest."""
    return ray_head.address


@pytest.fixture(scope="session")
def serve_port(ray_head) -> int:
    """The HTTP port of Serve on the session cluster. Serve's proxy keeps the port it first started
    on for the cluster's life, so every module that runs jobs/serve_up.py must pass this one."""
    return free_port()
