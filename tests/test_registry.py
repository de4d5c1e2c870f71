"""The federation's rules on the plain Registry (no Ray): slots, expiry, validation, exact residual,
persistence. Artifacts are random but well-formed (benchmarks.synthetic) except where training is
the point. The library (many concepts per slot, collections, paging) is in tests/test_library.py."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from blocklora.config import AdapterConfig, FederationConfig, TrainConfig
from blocklora.files.safefile import read_safetensors
from blocklora.method.slots import SlotSpace
from blocklora.pipeline.base import load_base
from blocklora.training.trainer import train_concept
from core_helpers import enrol, make_artifact, model_code_imported, write_images
from federation import errors
from federation.auth import token_hash
from federation.errors import ArtifactRejected, ReservationError, SlotUnavailable, Unauthorized, UnknownConcept
from federation.protocol import Removed
from federation.registry import Registry
from federation.store import StateStore

ADAPTER = AdapterConfig(rank=2, num_slots=4)
ADMIN = "admin-secret"


class Clock:
    """A hand-driven wall clock for reservation expiry."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")  # the registry only reads shapes and the fingerprint: safe to share


@pytest.fixture
def clock():
    return Clock()


def make_registry(base, tmp_path, clock, dtype=torch.float32, **cfg) -> Registry:
    return Registry(SlotSpace.of(base, ADAPTER), FederationConfig(reservation_ttl_s=60, **cfg),
                    StateStore(tmp_path / "state"), token_hash(ADMIN), clock, dtype)


@pytest.fixture
def reg(base, tmp_path, clock):
    reg = make_registry(base, tmp_path, clock)
    yield reg
    reg.close()


def snapshot(reg: Registry) -> tuple:
    """Everything observable, to prove a refused call changed nothing (memory and disk)."""
    return (reg.version, reg.list_concepts(), {k: v.clone() for k, v in reg.merged_residual().items()},
            reg.store.load(), sorted(p.name for p in reg.store.concepts.iterdir()))


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[3:] == b[3:] and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def submit_new(reg: Registry, base, token: str, name: str, seed: int = 0):
    slot = reg.reserve(token, name, "dog").slot
    art = make_artifact(base, ADAPTER, name, slot, seed=seed)
    return art, reg.submit(token, art.to_bytes())


def expected_residual(arts) -> dict[str, torch.Tensor]:
    keys = arts[0].meta.layout
    return {k: sum((a.delta(k) for a in arts), torch.zeros(keys[k])) for k in keys}


def test_one_persons_concepts_spread_over_the_slots_and_the_quota_holds(reg):
    tok = enrol(reg, ADMIN, "alice", quota=ADAPTER.num_slots + 1)
    grants = [reg.reserve(tok, f"c{i}", "dog") for i in range(ADAPTER.num_slots)]
    assert sorted(g.slot for g in grants) == list(range(ADAPTER.num_slots))
    assert grants[2].triggers == (f"<blk{grants[2].slot}>",) and grants[0].base_fingerprint == reg.space.fingerprint
    again = reg.reserve(tok, "c1", "dog")  # asking again renews: same slot, same reservation (training run)
    assert (again.slot, again.reservation_id) == (grants[1].slot, grants[1].reservation_id)
    assert reg.reserve(tok, "fifth", "dog").slot in range(ADAPTER.num_slots)  # K does not bound the library
    before = snapshot(reg)
    with pytest.raises(SlotUnavailable, match=r"'alice' already holds 5 .* allows \(5\)"):
        reg.reserve(tok, "one-too-many", "dog")
    assert same(before, snapshot(reg))


def test_concurrent_reservations_spread_evenly(reg):
    """Eight people at once on four slots: each slot gets two (the least used slot first), and the
    lock keeps the counts exact."""
    tokens = [enrol(reg, ADMIN, f"u{i}") for i in range(8)]
    slots = []
    threads = [threading.Thread(target=lambda i=i: slots.append(reg.reserve(tokens[i], f"concept-{i}", "dog").slot))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(slots) == sorted(list(range(ADAPTER.num_slots)) * 2)
    assert reg.info().slot_use == (2,) * ADAPTER.num_slots


def test_reservation_expires_and_slot_returns(reg, base, clock):
    tok = enrol(reg, ADMIN, "late-comer")
    slot = reg.reserve(tok, "late", "dog").slot
    art = make_artifact(base, ADAPTER, "late", slot)
    clock.now += 61
    assert reg.info().reserved == 0 and reg.list_concepts().items == ()
    with pytest.raises(ReservationError, match="no reservation"):
        reg.submit(tok, art.to_bytes())
    assert reg.reserve(enrol(reg, ADMIN, "other-one"), "other", "cat").slot == slot


def test_training_progress_is_listed_for_its_own_run_only(reg, base, clock):
    """A client job's step reports show on its held slot (with when it was reserved, kept across a
    renewal); a report for another run of the name, or for a slot no longer held, is dropped, and
    nothing of it reaches the state store. Going live stamps the concept's time."""
    tok = enrol(reg, ADMIN, "alice")
    grant = reg.reserve(tok, "pup", "dog")
    clock.now += 5
    stored = reg.store.load()
    assert reg.progress("pup", grant.reservation_id, 3, 10, 42.5)
    assert not reg.progress("pup", "another-run", 4, 10, 1.0)
    assert not reg.progress("ghost", grant.reservation_id, 1, 2, None)
    assert not reg.progress("PUP", grant.reservation_id, 4, 10, 1.0)  # the reserved spelling only
    assert reg.store.load() == stored
    reg.reserve(tok, "pup", "dog")  # a renewal: the same run
    (held,) = reg.list_concepts().items
    assert (held.status, held.reserved_at, held.expires_at) == ("reserved", 1_000.0, 1_005.0 + 60)
    assert (held.progress.step, held.progress.steps, held.progress.eta_s, held.progress.at) == (3, 10, 42.5, 1_005.0)
    assert held.to_dict()["progress"] == {"step": 3, "steps": 10, "eta_s": 42.5, "at": 1_005.0}
    for bad in ((11, 10, None), (-1, 10, None), (1, 10, float("nan")), (1, 10, -2.0), (True, 10, None),
                (1.0, 10, None)):
        with pytest.raises(errors.FederationError, match="progress"):
            reg.progress("pup", grant.reservation_id, *bad)
    clock.now += 1
    art = make_artifact(base, ADAPTER, "pup", grant.slot)
    assert reg.submit(tok, art.to_bytes()).live_at == 1_006.0 == reg.list_concepts().items[0].live_at
    assert not reg.progress("pup", grant.reservation_id, 10, 10, 0.0)
    again = reg.reserve(tok, "pup2", "dog")
    assert reg.progress("pup2", again.reservation_id, 1, 5, None)
    reg.remove(tok, "pup2")
    assert reg.reserve(tok, "pup2", "dog").reservation_id != again.reservation_id
    assert [c.progress for c in reg.list_concepts().items if c.status == "reserved"] == [None]
    assert "progress" not in json.dumps(reg.store.load())


def test_records_from_before_the_timestamps_load(base, tmp_path, clock):
    """Concepts and reservations stored before they recorded their times load with time 0."""
    reg = make_registry(base, tmp_path, clock)
    alice = enrol(reg, ADMIN, "alice")
    submit_new(reg, base, alice, "a")
    reg.reserve(alice, "pending", "cat")
    raw = reg.store.load()
    older = {("concept", "a"): {k: v for k, v in raw["concept"]["a"].items() if k != "live_at"},
             ("reservation", "pending"): {k: v for k, v in raw["reservation"]["pending"].items() if k != "reserved_at"}}
    reg.store.commit(older)
    reg.close()
    again = make_registry(base, tmp_path, clock)
    times = [(c.name, getattr(c, "live_at", None), getattr(c, "reserved_at", None))
             for c in again.list_concepts().items]
    assert times == [("a", 0.0, None), ("pending", None, 0.0)] and again.quarantined == []
    again.close()


def test_residual_is_exact_sum_and_remove_restores(reg, base):
    alice, bob = enrol(reg, ADMIN, "alice"), enrol(reg, ADMIN, "bob")
    a, ra = submit_new(reg, base, alice, "dog-a", seed=1)
    b, rb = submit_new(reg, base, bob, "dog-b", seed=2)
    assert (ra.version, rb.version, reg.version) == (1, 2, 2) and a.meta.slot != b.meta.slot
    res = reg.merged_residual()
    for k, v in expected_residual([a, b]).items():
        assert torch.equal(res[k], v), k
    with pytest.raises(Unauthorized, match="another person"):
        reg.remove(bob, "dog-a")
    assert reg.remove(alice, "dog-a") == Removed("dog-a", a.meta.slot, 3, "concept")
    res = reg.merged_residual()
    for k, v in expected_residual([b]).items():
        assert torch.equal(res[k], v), k
    assert reg.reserve(alice, "again", "dog").slot == a.meta.slot  # the freed slot is handed out again
    reg.remove(ADMIN, "dog-b")
    assert all(torch.count_nonzero(v) == 0 for v in reg.merged_residual().values())
    assert [c.status for c in reg.list_concepts().items] == ["reserved"]
    with pytest.raises(UnknownConcept):
        reg.remove(ADMIN, "dog-b")


def test_trained_artifact_goes_live(reg, base, tmp_path):
    tok = enrol(reg, ADMIN, "someone")
    grant = reg.reserve(tok, "trained", "dog")
    adapter = grant.adapter
    art = train_concept(load_base("tiny"), write_images(tmp_path / "imgs", n=2), "trained", "dog", grant.slot,
                        adapter, TrainConfig(steps=2, batch_size=1, resolution=32), progress=False)
    assert reg.submit(tok, art.to_bytes()).version == 1
    for k, v in expected_residual([art]).items():
        assert torch.equal(reg.merged_residual()[k], v)


def _corrupt(name: str):
    """Each case turns a good artifact (reserved by its owner) into bad bytes."""
    def nan(art):
        key = next(k for k in art.tensors if k.endswith("lora_B"))
        art.tensors[key][0, 0] = float("nan")
        return art.to_bytes()

    def shapes(art):
        key = next(k for k in art.tensors if k.endswith("lora_A"))
        art.tensors[key] = art.tensors[key][:, :-1].contiguous()
        return art.to_bytes()

    def fingerprint(art):
        return dataclasses.replace(art, meta=dataclasses.replace(art.meta, base_fingerprint="0" * 64)).to_bytes()

    def other_slot(art):
        return dataclasses.replace(art, meta=dataclasses.replace(
            art.meta, slot=art.meta.slot + 1, triggers=(f"<blk{art.meta.slot + 1}>",))).to_bytes()

    return {"nan": nan, "shapes": shapes, "fingerprint": fingerprint, "other_slot": other_slot,
            "truncated": lambda art: art.to_bytes()[:-100], "not_bytes": lambda art: "text"}[name]


@pytest.mark.parametrize("case, error, message", [
    ("nan", ArtifactRejected, "NaN or Inf"),
    ("shapes", ArtifactRejected, "shape"),
    ("fingerprint", ArtifactRejected, "trained on base"),
    ("other_slot", ReservationError, "reservation is for slot"),
    ("truncated", ArtifactRejected, "truncated|trailing|runs past"),
    ("not_bytes", ArtifactRejected, "sent as bytes"),
])
def test_bad_submissions_change_nothing(reg, base, case, error, message):
    tok = enrol(reg, ADMIN, "someone")
    submit_new(reg, base, tok, "kept")
    slot = reg.reserve(tok, "bad", "dog").slot
    data = _corrupt(case)(make_artifact(base, ADAPTER, "bad", slot, seed=5))
    before = snapshot(reg)
    with pytest.raises(error, match=message):
        reg.submit(tok, data)
    assert same(before, snapshot(reg))


def test_foreign_token_size_limit_and_wrong_token(base, tmp_path, clock):
    reg = make_registry(base, tmp_path, clock, max_artifact_bytes=4096)
    alice, mallory = enrol(reg, ADMIN, "alice"), enrol(reg, ADMIN, "mallory")
    slot = reg.reserve(alice, "alices", "dog").slot
    data = make_artifact(base, ADAPTER, "alices", slot).to_bytes()
    before = snapshot(reg)
    with pytest.raises(ArtifactRejected, match="at most 4,096"):
        reg.submit(alice, data)
    reg.config = dataclasses.replace(reg.config, max_artifact_bytes=len(data))
    with pytest.raises(ReservationError, match="reserved by another client"):
        reg.submit(mallory, data)
    with pytest.raises(Unauthorized, match="not recognised"):
        reg.submit(alice.split(".")[0] + ".forged", data)
    with pytest.raises(Unauthorized, match="admin token cannot"):
        reg.reserve(ADMIN, "x", "dog")
    with pytest.raises(ReservationError, match="reserved by another client"):
        reg.reserve(mallory, "alices", "dog")
    assert same(before, snapshot(reg))


def test_state_survives_a_new_registry(base, tmp_path, clock):
    reg = make_registry(base, tmp_path, clock)
    alice = enrol(reg, ADMIN, "alice")
    a, _ = submit_new(reg, base, alice, "a", seed=1)
    b, _ = submit_new(reg, base, alice, "b", seed=2)
    reg.remove(alice, "a")
    c, _ = submit_new(reg, base, alice, "c", seed=3)
    reg.reserve(alice, "pending", "cat")
    ours = reg.store.write_concept("d", b"interrupted")[0]  # written, its record never committed
    (reg.store.concepts / f".{ours}.abc123.tmp").write_bytes(b"x")  # and a tmp file of that write
    operators = {".half-written.safetensors.tmp", "orphan-0123.safetensors", "README.txt"}
    for name in operators:  # files the coordinator did not write: left alone (issue #40.10)
        (reg.store.concepts / name).write_bytes(b"x")
    listing, version = reg.list_concepts(), reg.version
    reg.close()
    again = make_registry(base, tmp_path, clock)
    assert again.version == version == 4 and again.quarantined == []
    assert again.list_concepts() == listing
    assert again.whoami(alice).name == "alice" and again.whoami(ADMIN).admin
    for k, v in expected_residual([b, c]).items():
        assert torch.equal(again.merged_residual()[k], v)
    assert sorted(p.name for p in again.store.concepts.iterdir()) == sorted(
        {again.concepts["b"].file, again.concepts["c"].file} | operators)
    again.close()
    with pytest.raises(RuntimeError, match="was created with"):
        Registry(SlotSpace.of(base, dataclasses.replace(ADAPTER, rank=3)), FederationConfig(),
                 StateStore(tmp_path / "state"))


def test_retried_submit_is_idempotent(reg, base):
    """A submit whose reply was lost (coordinator crash) is retried: the same owner and bytes get the
    live record back, nothing changes; anyone else, or other bytes, is still refused."""
    tok, other = enrol(reg, ADMIN, "alice"), enrol(reg, ADMIN, "bob")
    art, first = submit_new(reg, base, tok, "dog")
    before = snapshot(reg)
    assert reg.submit(tok, art.to_bytes()) == first
    assert same(snapshot(reg), before)
    with pytest.raises(SlotUnavailable, match="'dog' is already live"):
        reg.submit(other, art.to_bytes())
    changed = make_artifact(base, ADAPTER, "dog", art.meta.slot, seed=5)
    with pytest.raises(SlotUnavailable, match="'dog' is already live"):
        reg.submit(tok, changed.to_bytes())
    assert same(snapshot(reg), before)


def test_admin_uploads_without_reservation_under_a_free_name(reg, base):
    alice = enrol(reg, ADMIN, "alice")
    held = reg.reserve(alice, "alices", "dog").slot
    before = snapshot(reg)
    with pytest.raises(ReservationError, match="reserved by another client"):
        reg.submit(ADMIN, make_artifact(base, ADAPTER, "ALICES", held).to_bytes())  # the name, in any case
    assert same(before, snapshot(reg))
    out = reg.submit(ADMIN, make_artifact(base, ADAPTER, "by-admin", held).to_bytes())  # slots are shared
    assert out.slot == held and out.version == before[0] + 1
    assert {c.name: c.owner for c in reg.list_concepts().items}["by-admin"] == "admin"
    reg.remove(ADMIN, "by-admin")


def test_base_untouched_and_live_set_served_as_one_lora(base, tmp_path, clock):
    vocab, table = len(base.pipe.tokenizer), base.pipe.text_encoder.get_input_embeddings().weight.clone()
    reg = make_registry(base, tmp_path, clock)  # reads the base's shapes, never changes it
    assert len(base.pipe.tokenizer) == vocab
    assert torch.equal(base.pipe.text_encoder.get_input_embeddings().weight, table)
    with pytest.raises(UnknownConcept, match="nothing to download"):
        reg.merged_lora()
    alice = enrol(reg, ADMIN, "alice")
    arts = [submit_new(reg, base, alice, name, seed=i)[0] for i, name in enumerate(("a", "b"))]
    with pytest.raises(errors.FederationError, match="'ties' is not offered"):
        reg.merged_lora("ties")
    version, data = reg.merged_lora("mean")
    tensors, header = read_safetensors(data, len(data))
    assert version == 2 and header["rule"] == "mean" and set(json.loads(header["concepts"])) == {"a", "b"}
    for k in arts[0].meta.layout:
        got = tensors[f"{k}.lora_B.weight"] @ tensors[f"{k}.lora_A.weight"]
        torch.testing.assert_close(got, 0.5 * (arts[0].delta(k) + arts[1].delta(k)), rtol=1e-6, atol=1e-7)


def test_a_bfloat16_coordinator_reopens_a_float32_federation(base, tmp_path, clock):
    """`start_coordinator.py --dtype bfloat16` on a float32 federation's folder: the base's fingerprint
    does not depend on its dtype, so the state is accepted; the float32 artifacts go into a merged
    residual held in bf16, equal to the float32 one within bf16 rounding."""
    reg = make_registry(base, tmp_path, clock)
    a, _ = submit_new(reg, base, enrol(reg, ADMIN, "alice"), "a", seed=1)
    reg.close()
    half = make_registry(load_base("tiny", dtype=torch.bfloat16), tmp_path, clock, torch.bfloat16)
    assert half.info().base_fingerprint == reg.info().base_fingerprint and half.version == reg.version
    res = half.merged_residual()
    for k, v in expected_residual([a]).items():
        assert res[k].dtype == torch.bfloat16
        torch.testing.assert_close(res[k].float(), v, rtol=1e-2, atol=1e-2 * float(v.abs().max()))


def test_the_coordinator_starts_without_the_model_code(base, tmp_path):
    """The coordinator actor's own start-up, in a fresh process: from the space as JSON it opens the
    federation without importing diffusers or transformers (~1.5 s instead of ~5-6 s on 2 cores,
    again at every restart after a crash); `coordinator.start` reads the space from the base."""
    reg = Registry(SlotSpace.of(base, ADAPTER), FederationConfig(), StateStore(tmp_path / "state"), token_hash(ADMIN))
    enrol(reg, ADMIN, "alice")
    reg.close()
    code = ("import json, sys; from federation.coordinator import Coordinator; a = json.loads(sys.argv[1]); "
            "c = Coordinator(a['state'], a['space'], {}, None); info = c.info(); "
            "print(json.dumps([info.base_fingerprint, info.resolution, c.version()]))")
    args = json.dumps({"state": str(tmp_path / "state"), "space": SlotSpace.of(base, ADAPTER).to_dict()})
    imported, printed = model_code_imported(code, args)
    assert imported == [] and json.loads(printed) == [base.fingerprint, base.resolution, reg.version]
