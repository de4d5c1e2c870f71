"""The federation's refusals, in a module of their own: a client's driver catches them without
importing the registry (and with it torch and diffusers). `federation.registry` re-exports them."""

from __future__ import annotations


class FederationError(Exception):
    """A request the federation refuses; the message says what was wrong and what to do."""


class Unauthorized(FederationError):
    """Unknown token, or a token that may not act on this concept."""


class SlotUnavailable(FederationError):
    """No slot fits the request (the named concepts hold every slot), a quota is reached, or the name is taken."""


class ReservationError(FederationError):
    """The request does not match a current reservation (missing, expired, another client's, other slot)."""


class ArtifactRejected(FederationError):
    """The submitted bytes are not an acceptable concept for this federation."""


class UnknownConcept(FederationError):
    """No live concept or reservation has this name."""


class SlotClash(FederationError):
    """A set of concepts to merge holds two in one slot: their rows would add up in the same block."""


class StateUnavailable(FederationError):
    """The state folder cannot be written (read-only, full): nothing changed; retry once it is fixed."""
