"""One request as the route functions see it (`Request`) and what they answer (`Reply`).

Route functions are `fn(req, **path_params) -> Reply`; they raise `HubError` for anything the client got wrong.
Access checks live here so every route applies the same rules: a repo the caller may not read is reported as
missing (RepoNotFound), never as forbidden, so private repo names do not leak.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from .auth import Identity
from .errors import HubError, bad_request, repo_not_found
from .httpio import Body
from .storage import check_name

PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    file: Path | None = None  # when set, `length` bytes of it from `offset` are the body
    offset: int = 0
    length: int = 0


def json_reply(obj, status: int = 200, headers: dict | None = None) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


class Request:
    def __init__(self, handler, hub):
        self.hub = hub
        self.method = handler.command
        self.path, _, qs = handler.path.partition("?")
        self.query = parse_qs(qs, keep_blank_values=True)
        self.headers = handler.headers
        self.body = Body(handler.rfile, handler.headers, hub.limits.max_file_bytes)
        self._identity: Identity | None | bool = False

    @property
    def identity(self) -> Identity | None:
        if self._identity is False:
            self._identity = self.hub.users.identify(self.headers.get("Authorization"))
        return self._identity

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true", "yes")

    def json(self, max_len: int | None = None):
        raw = self.body.read_all(max_len or self.hub.limits.max_json_bytes)
        try:
            return json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise bad_request("Malformed JSON body") from None

    def json_object(self) -> dict:
        data = self.json()
        if not isinstance(data, dict):
            raise bad_request("Expected a JSON object")
        return data

    @property
    def base_url(self) -> str:
        # The client checks that URLs we return (repo URL, commit URL) live on its own endpoint: echo its Host.
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.hub.endpoint

    def repo(self, rtype: str, ns: str, name: str, write: bool = False) -> dict:
        """Metadata of the repo if the caller may see it (and write to it with write=True)."""
        repo_id = f"{ns}/{name}"
        ident = self.identity
        try:
            check_name(ns), check_name(name)
            meta = self.hub.storage.meta(rtype, repo_id)
        except HubError:
            meta = None
        if meta is None or (meta["private"] and not (ident and ident.can_read(ns))):
            raise repo_not_found(repo_id, ident is not None)
        if write and not (ident and ident.can_write(ns)):
            if ident is None:
                raise HubError(401, "You must be authenticated to write to this repo")
            raise HubError(403, f"You don't have the rights to write to {repo_id} (token scope: {ident.scope})")
        return meta

    def need_user(self) -> Identity:
        if self.identity is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>)")
        return self.identity
