"""The concept library on the plain Registry (no Ray): more concepts than slots, `with`, clashes,
collections merged exactly, paging and filters, invitations and names, and a restart with a large
library (scaled down)."""

from __future__ import annotations

import pytest
import torch

import core_helpers
from blocklora.config import AdapterConfig
from blocklora.pipeline.base import load_base
from core_helpers import enrol, make_artifact
from federation.auth import new_client_token, new_invitation_code
from federation.errors import (
    FederationError,
    ReservationError,
    SlotClash,
    SlotUnavailable,
    Unauthorized,
    UnknownConcept,
)
from federation.protocol import Clash, ConceptQuery
from federation.registry import Registry

ADAPTER = AdapterConfig(rank=2, num_slots=4)
ADMIN = "library-admin"


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def open_registry(base, folder, **cfg) -> Registry:
    return core_helpers.open_registry(base, folder, ADAPTER, ADMIN, **cfg)


@pytest.fixture
def reg(base, tmp_path):
    reg = open_registry(base, tmp_path / "state", max_concepts_per_person=100)
    yield reg
    reg.close()


add = core_helpers.add_concept


def state(reg: Registry) -> tuple:
    return reg.version, reg.list_concepts(ConceptQuery(limit=1000)), reg.list_collections(), reg.store.load()


def exact(residual: dict[str, torch.Tensor], arts) -> bool:
    return all(torch.equal(v, sum((a.delta(k) for a in arts), torch.zeros_like(v))) for k, v in residual.items())


def test_more_concepts_than_slots_each_clash_named(reg, base):
    """The 17th and every later concept of a K-slot federation is accepted; concepts in one slot
    cannot be merged together, and both the check and the refusal name the pair and the slot."""
    alice, bob = enrol(reg, ADMIN, "alice", quota=20), enrol(reg, ADMIN, "bob", quota=20)
    arts = {f"a{i}": add(reg, base, alice, f"a{i}", seed=i) for i in range(9)}
    arts |= {f"b{i}": add(reg, base, bob, f"b{i}", seed=10 + i) for i in range(3)}
    slots = {n: a.meta.slot for n, a in arts.items()}
    assert reg.info().live == 12 and reg.info().slot_use == (3, 3, 3, 3)
    assert sorted(slots[f"a{i}"] for i in range(4)) == [0, 1, 2, 3]  # one person's first K spread over K slots
    same_slot = [n for n in arts if slots[n] == slots["a0"] and n != "a0"][0]
    verdict = reg.mergeable(["a0", "a1", same_slot, "nope"])
    assert not verdict.mergeable and verdict.unknown == ("nope",)
    assert verdict.clashes == (Clash(slots["a0"], ("a0", same_slot)),)
    before = state(reg)
    with pytest.raises(SlotClash, match=rf"'a0' and '{same_slot}' are both in slot {slots['a0']}"):
        reg.resolve({"a0": 1.0, same_slot: 0.5})
    with pytest.raises(UnknownConcept, match=r"\['nope'\] are not live"):
        reg.resolve({"a0": 1.0, "nope": 1.0})
    assert state(reg) == before
    plan = reg.resolve({"a0": 1.0, "a1": -0.5})
    assert [(r.name, r.slot, r.weight) for r in plan.concepts] == [("a0", slots["a0"], 1.0), ("a1", slots["a1"], -0.5)]
    assert plan.concepts[0].phrase == f"<blk{slots['a0']}> dog" and plan.version == reg.version
    assert reg.mergeable(["a0", "a1"]).mergeable


def test_with_asks_for_a_slot_apart_from_named_concepts(reg, base):
    alice = enrol(reg, ADMIN, "alice", quota=20)
    for i in range(3):
        add(reg, base, alice, f"c{i}", seed=i)
    grant = reg.reserve(alice, "fits", "dog", ("c0", "c1", "c2"))
    assert grant.slot not in {reg.concepts[f"c{i}"].slot for i in range(3)}
    reg.submit(ADMIN, make_artifact(base, ADAPTER, "blocker", grant.slot).to_bytes())  # the admin's, into that slot
    bob = enrol(reg, ADMIN, "bob")
    before = state(reg)
    with pytest.raises(SlotUnavailable, match="the concepts named in 'with' hold all 4 slots"):
        reg.reserve(alice, "impossible", "dog", ("c0", "c1", "c2", "fits"))  # a reservation counts too
    with pytest.raises(UnknownConcept, match=r"'with' names \['ghost'\]"):
        reg.reserve(alice, "x", "dog", ("ghost",))
    with pytest.raises(FederationError, match="'with' must be a list"):
        reg.reserve(alice, "x", "dog", "c0")
    with pytest.raises(FederationError, match=r"names \['C0', 'c0'\] more than once"):
        reg.reserve(alice, "x", "dog", ("c0", "C0"))
    with pytest.raises(SlotClash, match="cancel the reservation"):  # a held slot is not moved under a training run
        reg.reserve(alice, "fits", "dog", ("blocker",))
    assert state(reg) == before
    assert reg.reserve(bob, "with-bobs", "dog", ("c1",)).slot != reg.concepts["c1"].slot


def test_collections_are_merged_exactly_and_follow_removals(reg, base):
    alice, bob = enrol(reg, ADMIN, "alice", quota=20), enrol(reg, ADMIN, "bob")
    arts = {f"c{i}": add(reg, base, alice, f"c{i}", seed=i) for i in range(6)}  # c4, c5 share slots with c0, c1
    assert reg.collection("default").members == {f"c{i}": i for i in range(4)}  # today's live set: first per slot
    assert exact(reg.merged_residual(), [arts[f"c{i}"] for i in range(4)])
    mine = reg.put_collection(alice, "mine", ["c4", "c2"])
    assert mine.members == {"c4": 0, "c2": 2} and mine.owner == "alice"
    assert exact(reg.merged_residual("mine"), [arts["c4"], arts["c2"]])
    before = state(reg)
    for call, error, match in [
        (lambda: reg.put_collection(alice, "mine", ["c4", "c0"]), SlotClash, "'c4' and 'c0' are both in slot 0"),
        (lambda: reg.put_collection(alice, "mine", ["ghost"]), UnknownConcept, r"\['ghost'\] are not live"),
        (lambda: reg.put_collection(alice, "bad name!", []), FederationError, "collection name"),
        (lambda: reg.put_collection(bob, "mine", ["c1"]), Unauthorized, "belongs to 'alice'"),
        (lambda: reg.put_collection(bob, "default", ["c1"]), Unauthorized, "belongs to 'admin'"),
        (lambda: reg.put_collection(alice, "MINE", ["c1"]), FederationError, "named 'mine'"),
        (lambda: reg.delete_collection(alice, "default"), FederationError, "cannot be deleted"),
        (lambda: reg.merged_lora(collection="nope"), UnknownConcept, "no collection named 'nope'"),
    ]:
        with pytest.raises(error, match=match):
            call()
    assert state(reg) == before
    reg.put_collection(alice, "mine", ["c4", "c3", "c1"])  # c2 leaves, c3 and c1 join: only their rows move
    assert exact(reg.merged_residual("mine"), [arts["c4"], arts["c3"], arts["c1"]])
    reg.remove(alice, "c3")  # leaves every collection
    assert reg.collection("mine").members == {"c4": 0, "c1": 1} and "c3" not in reg.collection("default").members
    assert exact(reg.merged_residual("mine"), [arts["c4"], arts["c1"]])
    assert exact(reg.merged_residual(), [arts["c0"], arts["c1"], arts["c2"]])
    reg.put_collection(ADMIN, "default", ["c0", "c5"])  # the admin edits the default one
    assert exact(reg.merged_residual(), [arts["c0"], arts["c5"]])
    version, data = reg.merged_lora(collection="mine")
    assert version == reg.version and len(data) > 0
    assert reg.list_concepts(ConceptQuery(collection="mine")).total == 2
    assert reg.delete_collection(alice, "mine").name == "mine"
    assert [c.name for c in reg.list_collections()] == ["default"]


def test_paging_and_filters(reg, base):
    alice, bob = enrol(reg, ADMIN, "alice", quota=30), enrol(reg, ADMIN, "Bob Smith", quota=30)
    for i in range(7):
        add(reg, base, alice, f"cat-{i}", seed=i)
    for i in range(5):
        add(reg, base, bob, f"dog-{i}", seed=20 + i)
    reg.reserve(bob, "dog-pending", "dog")
    seen, cursor = [], None
    while True:
        page = reg.list_concepts(ConceptQuery(limit=5, cursor=cursor))
        assert page.total == 13
        seen += [c.name for c in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == sorted(seen) and len(seen) == 13 and "dog-pending" in seen
    assert [c.name for c in reg.list_concepts(ConceptQuery(prefix="DOG-", status="live")).items] == [
        f"dog-{i}" for i in range(5)]
    assert reg.list_concepts(ConceptQuery(owner="bob smith")).total == 6
    assert reg.list_concepts(ConceptQuery(status="reserved")).items[0].name == "dog-pending"
    slot0 = reg.list_concepts(ConceptQuery(slot=0))
    assert slot0.total == sum(c.slot == 0 for c in reg.concepts.values()) + (reg.reservations["dog-pending"].slot == 0)
    assert reg.list_concepts(ConceptQuery(class_word="cat")).total == 0
    before = state(reg)
    for query, match in [(ConceptQuery(limit=0), "limit must be"), (ConceptQuery(limit=1001), "limit must be"),
                         (ConceptQuery(cursor="!!"), "cursor"), (ConceptQuery(cursor="Tk9QRQ"), "cursor"),
                         (ConceptQuery(slot=4), "slot must be"), (ConceptQuery(status="gone"), "status"),
                         (ConceptQuery(prefix="x" * 65), "prefix")]:
        with pytest.raises(FederationError, match=match):
            reg.list_concepts(query)
    with pytest.raises(UnknownConcept, match="no collection"):
        reg.list_concepts(ConceptQuery(collection="none"))
    assert state(reg) == before


def test_names_are_unique_regardless_of_case_and_nobody_is_the_admin(reg, base):
    alice = enrol(reg, ADMIN, "alice")
    add(reg, base, alice, "fire")
    before = state(reg)
    for name in ("Fire", "FIRE"):
        with pytest.raises(SlotUnavailable, match="'fire' is already live"):
            reg.reserve(alice, name, "dog")
    for person in ("admin", "Admin", "ADMIN", "аdmin", "admin\u200b", "Alice", " bob"):
        with pytest.raises(FederationError, match="admin's|not allowed|already invited"):
            reg.invite(ADMIN, person, new_invitation_code())
    assert state(reg) == before


def test_invitations_bound_registration_and_the_quota_counts_the_person(reg, base):
    code = new_invitation_code()
    assert reg.invite(ADMIN, "carol", code, quota=2, uses=2).uses == 2
    assert reg.invite(ADMIN, "carol", code, quota=2, uses=2).name == "carol"  # a retry: the same invitation
    laptop, desktop = new_client_token(), new_client_token()
    assert reg.register(code, laptop).name == "carol"
    assert reg.register(code, laptop).client_id == laptop.split(".")[0]  # a retry: the same client
    reg.register(code, desktop)
    before = state(reg)
    with pytest.raises(Unauthorized, match="used as often as it allows"):
        reg.register(code, new_client_token())
    with pytest.raises(Unauthorized, match="invitation code"):
        reg.register("p0123456789abcdef." + "x" * 40, new_client_token())
    with pytest.raises(Unauthorized, match="only the admin"):
        reg.invite(laptop, "dave", new_invitation_code())
    assert state(reg) == before
    reg.reserve(laptop, "one", "dog")
    reg.reserve(desktop, "two", "dog")
    with pytest.raises(SlotUnavailable, match="'carol' already holds 2"):  # both clients count against carol
        reg.reserve(desktop, "three", "dog")
    reg.remove(laptop, "two")  # another client of the same person may cancel it


def test_a_class_word_other_than_the_reservations_is_refused(reg, base):
    alice = enrol(reg, ADMIN, "alice")
    slot = reg.reserve(alice, "kitty", "cat").slot
    before = state(reg)
    with pytest.raises(ReservationError, match="class word 'totally-different', but it was reserved as 'cat'"):
        reg.submit(alice, make_artifact(base, ADAPTER, "kitty", slot, class_word="totally-different").to_bytes())
    assert state(reg) == before


def test_a_retried_mutation_gets_the_first_answer(reg, base):
    """Issue #40: a DELETE that committed, whose reply was lost in a coordinator kill, was retried by
    Ray and answered 404. With a request id the retry gets the first answer, also after a restart."""
    alice = enrol(reg, ADMIN, "alice")
    add(reg, base, alice, "gone")
    first = reg.remove(alice, "gone", request_id="delete-0001")
    folder = reg.store.root
    reg.close()
    again = open_registry(base, folder)
    try:
        assert again.remove(alice, "gone", request_id="delete-0001") == first
        with pytest.raises(UnknownConcept):
            again.remove(alice, "gone", request_id="delete-0002")
        with pytest.raises(FederationError, match="already used for another call"):
            again.reserve(alice, "x", "dog", request_id="delete-0001")
        with pytest.raises(FederationError, match="request id"):
            again.remove(alice, "gone", request_id="short")
    finally:
        again.close()


def test_restart_with_a_large_library(base, tmp_path):
    """A library several times K (scaled down from the benchmark's 1,000): after a restart the same
    listing, collections, exact merged residuals and version; the artifacts stay on disk."""
    reg = open_registry(base, tmp_path / "state", max_concepts_per_person=200)
    tokens = [enrol(reg, ADMIN, f"user{i}", quota=40) for i in range(3)]
    arts = {}
    for i in range(60):
        arts[f"n{i:03d}"] = add(reg, base, tokens[i % 3], f"n{i:03d}", seed=i)
    reg.put_collection(tokens[0], "picked", ["n000", "n001", "n002", "n003"][: len({arts[n].meta.slot for n in
                                                                                   ("n000", "n001", "n002", "n003")})])
    before = state(reg)
    defaults = dict(reg.collection("default").members)
    reg.close()
    again = open_registry(base, tmp_path / "state")
    try:
        assert state(again) == before and again.quarantined == []
        assert exact(again.merged_residual(), [arts[n] for n in defaults])
        assert exact(again.merged_residual("picked"), [arts[n] for n in again.collection("picked").members])
        assert len(again._arts) <= 2 * ADAPTER.num_slots  # only collection members' tensors are in memory
    finally:
        again.close()
