"""Errors the local Hub answers with, shaped like the real Hub's.

`huggingface_hub` maps a failed response to an exception class by the `X-Error-Code` header first and the
status second (see PROTOCOL.md §1, beside this file). On an `http://` endpoint a bare 401/404 is *not*
recognised as "repository not found", so every not-found answer carries its code.
Messages never contain tokens: they are built from repo ids, paths and revisions only.
"""
from __future__ import annotations


class HubError(Exception):
    """An error answered to the client as `status` + JSON body `{"error": message}` + X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


class ClientGone(Exception):
    """The client closed the connection mid-request; nothing is answered and nothing is kept."""


def repo_not_found(repo_id: str, authenticated: bool) -> HubError:
    # Like the Hub: 401 when anonymous (maybe it exists and needs a token), 404 when a token was given.
    return HubError(
        404 if authenticated else 401,
        f"Repository Not Found for url: {repo_id}. Please make sure you specified the correct `repo_id` and "
        "`repo_type`. If you are trying to access a private or gated repo, make sure you are authenticated.",
        code="RepoNotFound",
    )


def revision_not_found(repo_id: str, revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision} (repo {repo_id})", code="RevisionNotFound")


def entry_not_found(path: str, commit: str | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit} if commit else {}
    return HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers=headers)


def bad_request(message: str) -> HubError:
    return HubError(400, message)


def forbidden(message: str) -> HubError:
    return HubError(403, message)


def too_large(message: str) -> HubError:
    return HubError(413, message)
