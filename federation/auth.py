"""Who may act in a federation: people the admin invited, their clients, and the admin, by bearer token.

Registration is the operator's to control (docs/security.md says why invitations): the admin
invites a person by name, with a quota of concepts; the invitation's code lets that person
register a bounded number of clients (machines, token files), and whatever those clients hold
counts against the person's one quota. Without an invitation nobody registers.

Secrets are drawn by whoever keeps them — the client draws its token, the admin's side the
invitation code — and the federation keeps only their sha256 digests, compared in constant time.
So a retried registration or invitation (a reply lost in a coordinator crash) is recognised by its
digest and answered again, and no secret is ever stored. A client token is "<client id>.<secret>",
an invitation code "<person id>.<secret>": the digest to compare is found without a scan.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from federation.errors import FederationError, Unauthorized
from federation.protocol import Principal

ADMIN = "admin"  # the admin token's principal; client ids start with "c", person ids with "p"
MAX_PERSON_NAME = 64
# what listings show as an owner: ASCII letters and digits with a few separators, so no name can
# pass for another by case, look-alike letters (Cyrillic "а") or invisible characters
PERSON_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 ._@'-]{0,62}[A-Za-z0-9])?")
SECRET = r"[A-Za-z0-9_-]{32,128}"
TOKEN_RE = re.compile(rf"c[0-9a-f]{{16}}\.{SECRET}")
CODE_RE = re.compile(rf"p[0-9a-f]{{16}}\.{SECRET}")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A random secret (the admin's token, a client's, an invitation's part)."""
    return secrets.token_urlsafe(32)


def new_client_token() -> str:
    """What a client registers with: it draws its own token and keeps it."""
    return f"c{secrets.token_hex(8)}.{new_token()}"


def new_invitation_code() -> str:
    return f"p{secrets.token_hex(8)}.{new_token()}"


def name_key(name: str) -> str:
    """Person and concept names are unique case-insensitively (both are ASCII)."""
    return name.lower()


def check_person_name(name: object) -> str:
    if type(name) is not str or not PERSON_NAME_RE.fullmatch(name) or "  " in name:
        shown = ascii(name)[:80] if isinstance(name, str) else type(name).__name__
        raise FederationError(f"person name {shown} is not allowed: use 1-{MAX_PERSON_NAME} ASCII letters, digits, "
                              "single spaces and . _ @ ' -, starting and ending with a letter or digit")
    if name_key(name) == ADMIN:
        raise FederationError(f"person name {name!r} is the admin's; pick another")
    return name


@dataclass(frozen=True)
class Person:
    """Someone the admin invited: the quota their clients share, and what is left of the invitation."""

    name: str
    quota: int  # live concepts + reservations all of this person's clients may hold together
    invitation_sha256: str
    uses_left: int  # registrations the invitation still allows
    expires_at: float  # of the invitation, wall-clock seconds; registered clients do not expire


@dataclass(frozen=True)
class Client:
    """A registered token: one machine or token file of a person."""

    person: str
    token_sha256: str


@dataclass
class Accounts:
    """The admin's token digest, every person and every client. The registry changes it only
    after the change is committed to the state store."""

    admin_sha256: str | None = None
    people: dict[str, Person] = field(default_factory=dict)
    clients: dict[str, Client] = field(default_factory=dict)

    def authenticate(self, token: object) -> str:
        """The principal (client id or ADMIN) of a token."""
        if not isinstance(token, str) or not token:
            raise Unauthorized("a token (string) is required; register with an invitation to get one")
        digest = token_hash(token)
        if self.admin_sha256 and hmac.compare_digest(digest, self.admin_sha256):
            return ADMIN
        client = self.clients.get(token.partition(".")[0])
        if client is None or not hmac.compare_digest(digest, client.token_sha256):
            raise Unauthorized("token not recognised by this federation; register again (a token from "
                               "another federation or state folder is not valid here)")
        return token.partition(".")[0]

    def client(self, token: object) -> str:
        """The client id of a token that may reserve slots (the admin's may not)."""
        who = self.authenticate(token)
        if who == ADMIN:
            raise Unauthorized("the admin token cannot reserve slots; invite yourself and register a client (the "
                               "admin may upload a finished artifact into its own slot)")
        return who

    def require_admin(self, token: object, what: str) -> None:
        if self.authenticate(token) != ADMIN:
            raise Unauthorized(f"only the admin may {what}")

    def person_of(self, principal: str) -> str:
        """The person a client belongs to (the admin is its own person)."""
        return ADMIN if principal == ADMIN else self.clients[principal].person

    def name(self, principal: str) -> str:
        """What listings show as an owner: the person's name."""
        return ADMIN if principal == ADMIN else self.people[self.person_of(principal)].name

    def whoami(self, token: object) -> Principal:
        who = self.authenticate(token)
        return Principal(who, self.name(who), who == ADMIN)

    def person_named(self, name: str) -> str | None:
        key = name_key(name)
        return next((pid for pid, p in self.people.items() if name_key(p.name) == key), None)

    def redeem(self, code: object, now: float) -> str:
        """The person an invitation code belongs to, if it still allows a registration."""
        if type(code) is not str or not CODE_RE.fullmatch(code):
            raise Unauthorized("an invitation code (p<16 hex>.<secret>, from the admin) is required to register")
        person = self.people.get(code.partition(".")[0])
        if person is None or not hmac.compare_digest(token_hash(code), person.invitation_sha256):
            raise Unauthorized("invitation code not recognised by this federation; ask its admin for one")
        if person.uses_left < 1:
            raise Unauthorized(f"the invitation of {person.name!r} has been used as often as it allows; ask the "
                               "admin for another, or reuse a registered client's token file")
        if person.expires_at <= now:
            raise Unauthorized(f"the invitation of {person.name!r} expired; ask the admin for a new one")
        return code.partition(".")[0]
