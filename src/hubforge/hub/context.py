"""One request as the route functions see it (`Request`) and what they answer (`Reply`).

Route functions are `fn(req, **path_params) -> Reply`; they raise `HubError` for anything the client got wrong.
Access checks live here so every route applies the same rules: a repo the caller may not read is reported as
missing (RepoNotFound), never as forbidden, so private repo names do not leak.

Bodies are bounded by the route's kind before the route runs (`Request.bound`): JSON routes read theirs whole,
at most `max_json_bytes`, before any token is looked at; commits and LFS uploads stream theirs within their own
limits. JSON fields are read through `field`, which checks each one's type, so a client mistake is a 400 naming
the field and never a 500 (which the client would retry five times).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs

from .auth import Identity
from .errors import HubError, bad_request, repo_not_found
from .httpio import Body
from .storage import check_name

PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
NO_BODY_BYTES = 64 * 1024  # routes that take no body still drain a small one (keep-alive), but no more
_MISSING = object()
PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    file: Path | None = None  # when set, `length` bytes of it from `offset` are the body
    offset: int = 0
    length: int = 0
    stream: Iterator[bytes] | None = None  # when set, the body is sent chunked as the iterator yields (job logs)


def json_reply(obj, status: int = 200, headers: dict | None = None) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


class Request:
    def __init__(self, handler, hub):
        self.hub = hub
        self.method = handler.command
        self.path, _, qs = handler.path.partition("?")
        self.query = parse_qs(qs, keep_blank_values=True)
        self.headers = handler.headers
        self.body = Body(handler.rfile, handler.headers, NO_BODY_BYTES)
        self.content = b""  # the whole body of a JSON route, read by `bound`
        self._identity: Identity | None | bool = False

    def bound(self, kind: str) -> None:
        """Set the body limit for the route's kind ("none", "json", "commit", "file"); read JSON bodies now."""
        limits = self.hub.limits
        self.body.limit = {"none": NO_BODY_BYTES, "json": limits.max_json_bytes, "commit": limits.max_commit_bytes,
                           "file": limits.max_file_bytes}[kind]
        self.body.check_limit()
        if kind in ("none", "json"):
            self.content = self.body.read_all(self.body.limit)

    @property
    def identity(self) -> Identity | None:
        if self._identity is False:
            auth = self.headers.get("Authorization") or ""
            scoped = self.hub.oauth.identify(auth.partition(" ")[2].strip()) if auth[:7].lower() == "bearer " else None
            self._identity = scoped or self.hub.users.identify(auth or None)
        return self._identity

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true", "yes")

    def json(self):
        try:
            return json.loads(self.content or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise bad_request("Malformed JSON body") from None
        except RecursionError:
            raise bad_request("JSON body nested too deeply") from None

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
        if meta is None or (meta["private"] and not (ident and ident.can_read_repo(rtype, repo_id))):
            raise repo_not_found(repo_id, ident is not None)
        if write and not (ident and ident.can_write_repo(rtype, repo_id)):
            if ident is None:
                raise HubError(401, "You must be authenticated to write to this repo")
            raise HubError(403, ident.refusal(f"write to {repo_id}"))
        return meta

    def need_user(self) -> Identity:
        if self.identity is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>)")
        return self.identity


def field(body: dict, key: str, kind: type | tuple, *, required: bool = False, choices=None, default=None):
    """`body[key]` checked against `kind` (bool is not an int here) and `choices`; None/absent gives `default`."""
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise bad_request(f"`{key}` is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join({str: "a string", bool: "true or false", int: "an integer", list: "a list",
                             dict: "an object"}[k] for k in kinds)
        raise bad_request(f"`{key}` must be {names}, not {type(value).__name__}")
    if choices is not None and value not in choices:
        raise bad_request(f"`{key}` must be one of {', '.join(map(repr, choices))}, not {str(value)[:40]!r}")
    return value
