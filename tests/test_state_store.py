"""The state folder (issue #40): one coordinator at a time (a lock naming its holder, stale locks
taken over), any change of the live set at load raises the version, a folder that cannot be
written refuses changes with StateUnavailable while reads go on without writing, and a
pre-SQLite manifest.json is migrated on first start."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from blocklora.config import AdapterConfig, FederationConfig
from blocklora.method.slots import SlotSpace
from blocklora.pipeline.base import load_base
from conftest import REPO
from core_helpers import add_concept as add, enrol, make_artifact, open_registry
from federation.auth import new_client_token, token_hash
from federation.protocol import ConceptQuery
from federation.registry import Registry
from federation.store import LOCK, StateStore

ADAPTER = AdapterConfig(rank=2, num_slots=4)
ADMIN = "store-admin"


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def test_a_second_coordinator_is_refused_naming_the_holder(tmp_path, caplog):
    first = StateStore(tmp_path, "coordinator 'one' (namespace 'ns')")
    with pytest.raises(RuntimeError, match=r"in use by coordinator 'one' \(namespace 'ns'\) \(pid \d+"):
        StateStore(tmp_path, "coordinator 'other' (namespace 'ns')")
    first.close()
    StateStore(tmp_path, "coordinator 'other' (namespace 'ns')").close()  # free once its holder let go
    # a holder killed -9 leaves its lock file behind, but the kernel dropped its flock: stale, taken over
    code = ("import sys, time; from federation.store import StateStore; StateStore(sys.argv[1], 'coordinator dead'); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RuntimeError, match="in use by coordinator dead"):
        StateStore(tmp_path, "coordinator 'next'")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "coordinator dead" in (tmp_path / LOCK).read_text()
    caplog.set_level("WARNING")
    StateStore(tmp_path, "coordinator 'next'").close()
    assert "took over the lock of coordinator dead" in caplog.text


def test_any_change_of_the_live_set_at_load_raises_the_version(base, tmp_path):
    """Issue #40.3: a concept set aside at restart (its file damaged), or its record removed by
    hand, used to keep the version, so ingress and replicas kept serving it."""
    reg = open_registry(base, tmp_path, ADAPTER, ADMIN)
    alice = enrol(reg, ADMIN, "alice")
    for i, name in enumerate(("q1", "q2", "q3")):
        add(reg, base, alice, name, seed=i)
    version, files = reg.version, {n: reg.concepts[n].file for n in ("q1", "q2")}
    reg.close()
    (tmp_path / "concepts" / files["q2"]).write_bytes(b"damaged")
    reg = open_registry(base, tmp_path, ADAPTER, ADMIN)
    assert {(q.kind, q.name) for q in reg.quarantined} == {("concept", "'q2'"), ("collection member", "'default/q2'")}
    assert reg.version == version + 1
    assert "q2" not in reg.collection("default").members and reg.list_concepts().total == 2
    reg.close()
    db = sqlite3.connect(tmp_path / "federation.db")
    with db:
        db.execute("DELETE FROM records WHERE kind = 'concept' AND key = 'q1'")  # by hand
    db.close()
    reg = open_registry(base, tmp_path, ADAPTER, ADMIN)
    assert reg.version == version + 2 and [c.name for c in reg.list_concepts().items] == ["q3"]
    assert reg.collection("default").members == {"q3": reg.concepts["q3"].slot}
    assert (tmp_path / "concepts" / files["q1"]).exists()  # a file no record names is not ours to delete
    reg.close()
    assert open_registry(base, tmp_path, ADAPTER, ADMIN).version == version + 2  # no change: no new version


READ_ONLY_RUN = """
import resource, signal, sys, json
sys.path.insert(0, "tests")
from blocklora.pipeline.base import load_base
from blocklora.config import AdapterConfig, FederationConfig
from blocklora.method.slots import SlotSpace
from core_helpers import make_artifact
from federation.auth import token_hash
from federation.errors import StateUnavailable
from federation.registry import Registry
from federation.store import StateStore
base, adapter = load_base("tiny"), AdapterConfig(rank=2, num_slots=4)
reg = Registry(SlotSpace.of(base, adapter), FederationConfig(), StateStore(sys.argv[1]), token_hash("store-admin"))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # from here no file may grow: a full disk, as the OS says it
out = {"listed": reg.list_concepts().total, "reserved": reg.info().reserved}
for what, call in [("reserve", lambda: reg.reserve(sys.argv[2], "new", "dog")),
                   ("submit", lambda: reg.submit("store-admin", make_artifact(base, adapter, "new", 1).to_bytes())),
                   ("remove", lambda: reg.remove(sys.argv[2], "kept"))]:
    try:
        call()
        out[what] = "accepted"
    except StateUnavailable as err:
        out[what] = str(err)
reg.close()
print(json.dumps(out))
"""


def test_a_folder_that_cannot_be_written_refuses_changes_and_reads_go_on(base, tmp_path):
    """Issue #40.9: reads used to write (an expired reservation rewrote the manifest inside
    list_concepts and info) and a full disk gave bare 500s. Now reads never write, and a change
    the disk refuses is StateUnavailable (HTTP 503) naming the folder, with nothing changed."""
    reg = open_registry(base, tmp_path, ADAPTER, ADMIN, reservation_ttl_s=0.5)
    alice = enrol(reg, ADMIN, "alice")
    add(reg, base, alice, "kept")
    reg.reserve(alice, "expiring", "dog")
    before = reg.store.load()
    reg.close()
    time.sleep(0.6)
    done = subprocess.run([sys.executable, "-c", READ_ONLY_RUN, str(tmp_path), alice], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["listed"] == 1 and out["reserved"] == 0  # the expired reservation is not shown, and not purged
    for what in ("reserve", "submit", "remove"):
        assert out[what].startswith(f"the state folder {tmp_path} cannot be written"), out
        assert "Nothing changed" in out[what]
    reg = open_registry(base, tmp_path, ADAPTER, ADMIN)
    assert reg.store.load() == before
    assert [c.name for c in reg.list_concepts().items] == ["kept"]
    reg.close()


def test_a_manifest_json_federation_is_migrated(base, tmp_path):
    """A state folder of the JSON-manifest store: its records move into the database on first
    start, the manifest is kept as manifest.json.migrated, tokens and concepts work on."""
    art = make_artifact(base, ADAPTER, "old-dog", 2)
    data = art.to_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "concepts").mkdir(parents=True)
    (tmp_path / "concepts" / f"old-dog-{digest[:16]}.safetensors").write_bytes(data)
    token = new_client_token()
    cid = token.split(".")[0]
    manifest = {"format": "blocklora-federation", "format_version": 1, "base_spec": "tiny",
                "base_fingerprint": base.fingerprint, "adapter": ADAPTER.__dict__ | {"unet_targets": list(
                    ADAPTER.unet_targets), "text_targets": list(ADAPTER.text_targets)}, "version": 3,
                "admin_sha256": token_hash(ADMIN),
                "clients": {cid: {"name": "old timer", "token_sha256": token_hash(token)}},
                "reservations": {}, "concepts": {"old-dog": {
                    "client": cid, "slot": 2, "class_word": "dog", "triggers": ["<blk2>"],
                    "file": f"old-dog-{digest[:16]}.safetensors", "sha256": digest, "version": 3}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    reg = Registry(SlotSpace.of(base, ADAPTER), FederationConfig(), StateStore(tmp_path))
    try:
        assert not (tmp_path / "manifest.json").exists() and (tmp_path / "manifest.json.migrated").exists()
        assert reg.whoami(token).name == "old timer" and reg.whoami(ADMIN).admin
        assert reg.list_concepts(ConceptQuery(status="live")).items[0].name == "old-dog"
        assert reg.collection("default").members == {"old-dog": 2} and reg.version == 4 and reg.quarantined == []
        reg.remove(token, "old-dog")
    finally:
        reg.close()
