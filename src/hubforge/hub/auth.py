"""Users, organisations and access tokens of the local Hub.

A token belongs to one user and has a scope, `read` or `write`, valid for the user's own namespace and the
organisations the user is a member of. Only the sha256 of each token is stored (`users.json`, mode 0600), so the
data directory never holds a usable token except `<data_dir>/token`, the default user's, written on first start.

Access rules (mirroring the Hub): anyone reads public repos; private repos are readable by members of their
namespace; writing needs a `write` token for the namespace. A token issued by a Trusted Publisher exchange
(oauth.py) is scoped to one repo (`Identity.repo`): it reads and writes that repo only, and no namespace.
"""
from __future__ import annotations

import hashlib
import secrets
import string
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HubError
from .storage import check_name, now_iso, read_json, write_json

SCOPES = ("read", "write")
INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class Identity:
    name: str
    scope: str
    orgs: tuple[str, ...] = field(default_factory=tuple)
    repo: tuple[str, str] | None = None  # (repo type, repo id) of a token scoped to one repo

    @property
    def namespaces(self) -> set[str]:
        return set() if self.repo else {self.name, *self.orgs}

    def can_read(self, namespace: str) -> bool:
        return namespace in self.namespaces

    def can_write(self, namespace: str) -> bool:
        return self.scope == "write" and namespace in self.namespaces

    def can_read_repo(self, rtype: str, repo_id: str) -> bool:
        return self.repo == (rtype, repo_id) or self.can_read(repo_id.split("/")[0])

    def can_write_repo(self, rtype: str, repo_id: str) -> bool:
        return self.repo == (rtype, repo_id) or self.can_write(repo_id.split("/")[0])

    def refusal(self, what: str) -> str:
        """Why this identity may not do `what` (a 403 message)."""
        if self.repo:
            return (f"You don't have the rights to {what}: this token comes from a Trusted Publisher exchange and is "
                    f"scoped to the {self.repo[0]} repo {self.repo[1]} only")
        return f"You don't have the rights to {what} (token scope: {self.scope})"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    alphabet = string.ascii_letters
    return "hf_" + "".join(secrets.choice(alphabet) for _ in range(34))


class Users:
    """The user table, persisted in `users.json`; safe to use from many request threads."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._data = read_json(path, {"users": {}})
        self._index: dict[str, tuple[str, str]] = {}
        for name, user in self._data["users"].items():
            for tok in user["tokens"]:
                self._index[tok["sha256"]] = (name, tok["scope"])

    def __len__(self) -> int:
        return len(self._data["users"])

    def create_user(self, name: str, scope: str = "write", orgs=()) -> str:
        """Create `name` (or add to an existing user) a new token of `scope`; returns the token, shown once."""
        check_name(name, "user name")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        orgs = [check_name(o, "organization name") for o in orgs]
        token = new_token()
        with self._lock:
            users = self._data["users"]
            taken_orgs = {o for u in users.values() for o in u["orgs"]}
            if name in taken_orgs or any(o in users for o in orgs):
                raise ValueError("a user and an organization cannot share a name")
            user = users.setdefault(name, {"orgs": [], "tokens": [], "createdAt": now_iso()})
            user["orgs"] = sorted(set(user["orgs"]) | set(orgs))
            user["tokens"].append({"sha256": _hash(token), "scope": scope, "createdAt": now_iso()})
            write_json(self.path, self._data, mode=0o600)
            self._index[_hash(token)] = (name, scope)
        return token

    def identify(self, authorization: str | None) -> Identity | None:
        """`Authorization` header -> Identity; None when absent; 401 for a token we do not know."""
        if not authorization:
            return None
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise HubError(401, INVALID_TOKEN)
        found = self._index.get(_hash(token.strip()))
        if found is None:
            raise HubError(401, INVALID_TOKEN)
        name, scope = found
        return Identity(name, scope, tuple(self._data["users"][name]["orgs"]))

    def whoami(self, ident: Identity) -> dict:
        if ident.repo:  # like a fine-grained token with write on one repo
            rtype, repo_id = ident.repo
            return {"type": "user", "name": ident.name, "fullname": ident.name, "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {
                        "displayName": "trusted publisher", "role": "fineGrained",
                        "fineGrained": {"scoped": [{"entity": {"type": rtype, "name": repo_id},
                                                    "permissions": ["repo.content.read", "repo.write"]}]}}}}
        user = self._data["users"][ident.name]
        return {
            "type": "user", "id": hashlib.sha1(ident.name.encode()).hexdigest()[:24], "name": ident.name,
            "fullname": ident.name, "email": None, "emailVerified": False, "isPro": False, "canPay": False,
            "avatarUrl": "", "createdAt": user["createdAt"],
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": ident.scope} for o in ident.orgs],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "local", "role": ident.scope, "createdAt": user["createdAt"]}},
        }

    def is_namespace(self, name: str) -> bool:
        users = self._data["users"]
        return name in users or any(name in u["orgs"] for u in users.values())

