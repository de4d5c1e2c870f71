"""The rules of a concept library, as pure functions: where a new concept goes, which concepts clash,
and how a listing is paged. `federation.registry` applies them to its records.

A federation keeps any number of concepts; K (the adapter's slots) bounds how many one picture can
merge, not how many the library holds. Each concept owns one slot's rows, many concepts share a
slot, and a set of concepts can be merged exactly when their slots are pairwise different.

Slot choice at reservation (`choose_slot`): never a slot of a concept the client named in `with`
(so it can later be merged with them); among the rest, first the slots holding fewest of the
same person's concepts (one person's concepts are the likeliest to be combined: spread them),
then the least used slot, then the lowest number — deterministic, so a retry gets the same slot.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter
from typing import Mapping

from blocklora.method.artifact import NAME_RE
from federation.errors import FederationError, SlotClash, SlotUnavailable
from federation.protocol import STATUSES, Clash, ConceptQuery

MAX_PAGE = 1000  # entries of one listing page
MAX_NAMES = 64  # concept names in one `with`, merge check or request: more than any K


def choose_slot(num_slots: int, use: Counter[int], own: Counter[int], avoid: Mapping[int, str]) -> int:
    """The slot for a new reservation: `use` counts concepts per slot, `own` the same person's,
    `avoid` is slot -> a concept named in `with` that holds it."""
    free = [k for k in range(num_slots) if k not in avoid]
    if not free:
        held = ", ".join(f"{name!r} (slot {slot})" for slot, name in sorted(avoid.items()))
        raise SlotUnavailable(f"the concepts named in 'with' hold all {num_slots} slots ({held}); one picture merges "
                              f"at most {num_slots} concepts, so name at most {num_slots - 1}")
    return min(free, key=lambda k: (own[k], use[k], k))


def clashes(slots: Mapping[str, int]) -> list[Clash]:
    """Pairs of concepts (name -> slot, in the caller's order) that hold the same slot: each
    concept after the first of its slot, paired with that first one."""
    first: dict[int, str] = {}
    out = []
    for name, slot in slots.items():
        if slot in first:
            out.append(Clash(slot, (first[slot], name)))
        else:
            first[slot] = name
    return out


def refuse_clashes(slots: Mapping[str, int], what: str) -> None:
    found = clashes(slots)
    if found:
        c = found[0]
        raise SlotClash(f"{c.concepts[0]!r} and {c.concepts[1]!r} are both in slot {c.slot}, so {what} cannot hold "
                        "both: concepts merge exactly only in pairwise different slots. Drop one (GET "
                        "/v1/mergeable?concepts=... names every clash)")


def check_names(names: object, what: str) -> tuple[str, ...]:
    """A list of distinct concept names (as a request, `with` or a collection gives them)."""
    if type(names) not in (list, tuple) or len(names) > MAX_NAMES:
        raise FederationError(f"{what} must be a list of at most {MAX_NAMES} concept names, got "
                              f"{ascii(names)[:60]}")
    for name in names:
        if type(name) is not str or not NAME_RE.fullmatch(name):
            raise FederationError(f"{what}: {ascii(name)[:80]} is not a concept name (1-64 ASCII letters, digits, "
                                  "'-', '_' or '.', starting with a letter or digit)")
    seen = Counter(n.lower() for n in names)
    twice = sorted({n for n in names if seen[n.lower()] > 1})
    if twice:
        raise FederationError(f"{what} names {twice} more than once")
    return tuple(names)


def encode_cursor(key: str) -> str:
    """An opaque cursor: the name key of the last entry of a page."""
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        key = ""
    if len(cursor) > 100 or not NAME_RE.fullmatch(key) or key != key.lower():
        raise FederationError(f"cursor {ascii(cursor)[:60]} is not one this federation gave out; start from the "
                              "first page (no cursor) and follow next_cursor")
    return key


def check_query(q: ConceptQuery, num_slots: int) -> str | None:
    """Refuse a bad listing query, naming the field; returns the cursor's key."""
    if type(q.limit) is not int or not 1 <= q.limit <= MAX_PAGE:
        raise FederationError(f"limit must be an integer in 1..{MAX_PAGE}, got {ascii(q.limit)[:40]}")
    if q.slot is not None and (type(q.slot) is not int or not 0 <= q.slot < num_slots):
        raise FederationError(f"slot must be an integer in 0..{num_slots - 1}, got {ascii(q.slot)[:40]}")
    if q.status not in STATUSES:
        raise FederationError(f"status must be one of {list(STATUSES)}, got {ascii(q.status)[:40]}")
    for field in ("prefix", "owner", "class_word", "collection"):
        value = getattr(q, field)
        if value is not None and (type(value) is not str or not 0 < len(value) <= 64 or not value.isprintable()):
            raise FederationError(f"{field} must be 1-64 printable characters, got {ascii(value)[:60]}")
    return None if q.cursor is None else decode_cursor(q.cursor)
