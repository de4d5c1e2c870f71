"""Who may act in a federation: registered clients and the admin, by bearer token.

Tokens are random, shown once, and kept only as sha256 digests, compared in constant time. A client
token is "<client id>.<secret>" so the digest to compare is found without scanning every client.
`Accounts` is an immutable value: registering returns a new one, which the registry persists with
the rest of its state before swapping it in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from blocklora.files.schema import SchemaError, check_text
from federation.errors import FederationError, Unauthorized
from federation.protocol import Principal, Registration

ADMIN = "admin"  # the principal of the admin token; client ids start with "c", so never collide
MAX_CLIENT_NAME = 64


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Client:
    name: str
    token_sha256: str


@dataclass(frozen=True)
class Accounts:
    """The admin's token digest and every registered client."""

    admin_sha256: str | None = None
    clients: dict[str, Client] = field(default_factory=dict)

    def register(self, client_name: str = "") -> tuple["Accounts", Registration]:
        """A new client: the accounts that include it, and its token (returned this once)."""
        if type(client_name) is not str:
            raise FederationError(f"client name must be a string, got {type(client_name).__name__}")
        try:
            if client_name:  # empty: the client id is its name
                check_text(client_name, "client name", MAX_CLIENT_NAME)
        except SchemaError as err:
            raise FederationError(str(err)) from None
        client_id = "c" + secrets.token_hex(8)
        token = f"{client_id}.{new_token()}"
        clients = {**self.clients, client_id: Client(client_name or client_id, token_hash(token))}
        return dataclasses.replace(self, clients=clients), Registration(client_id, token)

    def authenticate(self, token: str) -> str:
        """The principal (client id or ADMIN) of a token."""
        if not isinstance(token, str) or not token:
            raise Unauthorized("a token (string) is required; register to get one")
        digest = token_hash(token)
        if self.admin_sha256 and hmac.compare_digest(digest, self.admin_sha256):
            return ADMIN
        client_id = token.partition(".")[0]
        client = self.clients.get(client_id)
        if client is None or not hmac.compare_digest(digest, client.token_sha256):
            raise Unauthorized("token not recognised by this federation; register again (a token from "
                               "another federation or state folder is not valid here)")
        return client_id

    def client(self, token: str) -> str:
        """The client id of a token that may reserve slots (the admin's may not)."""
        who = self.authenticate(token)
        if who == ADMIN:
            raise Unauthorized("the admin token cannot reserve slots; register a client (the admin may upload a "
                               "finished artifact into its own free slot)")
        return who

    def name(self, principal: str) -> str:
        """What listings show as a concept's owner."""
        return ADMIN if principal == ADMIN else self.clients[principal].name

    def whoami(self, token: str) -> Principal:
        who = self.authenticate(token)
        return Principal(who, self.name(who), who == ADMIN)
