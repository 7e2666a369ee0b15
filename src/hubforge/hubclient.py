"""Every way hubforge talks to a Hub, through the unmodified `huggingface_hub.HfApi`: the endpoint, the client,
retries, the credential for each repo, the credential preflight, and "make this repo hold exactly these files" in
one parent-pinned commit. Used by the publish and space stages (the only stages with Hub side effects) and by the
pipeline's preflight.

    from hubforge import hubclient
    token, how = hubclient.credential("me/model")      # how: "oidc" or "token" (see `credential`)
    api = hubclient.api(token)
    head, commit, deleted = hubclient.commit_exactly(api, "me/model", [("README.md", path)], "Publish ...", token)

Errors leave here as StageError, with any token redacted.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

from hubforge import products
from hubforge.errors import StageError
from hubforge.redact import redact

HF_HOSTS = ("huggingface.co", "hf.co")
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)  # seconds before attempts 2..5: rides out a restarting server or a 5xx burst
RETRY_STATUS = (408, 429, 500, 502, 503, 504, 412)  # 412: someone committed meanwhile; the next attempt re-reads head


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")  # read now: CLIs and tests set it late


def api(token: str | None):
    from huggingface_hub import HfApi

    from hubforge import __version__

    return HfApi(endpoint=endpoint(), token=token, library_name="hubforge", library_version=__version__)


def is_hf_host(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in HF_HOSTS)


def clean(text: str, token: str | None) -> str:
    return redact(text.replace(token, "***") if token else text)


def transient(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        return exc.response is not None and exc.response.status_code in RETRY_STATUS
    return isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError))


def with_retries(fn, what: str, token: str | None = None, delays=None, stage: str = "publish"):
    """fn() with backoff on connection errors and 5xx; other errors (and the last failure) become a StageError."""
    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below; the message is redacted either way
            if transient(exc) and attempt < len(delays):
                print(f"[{stage}] {what}: {clean(type(exc).__name__ + ': ' + str(exc), token)[:200]}; "
                      f"retrying in {delays[attempt]:.0f}s ({attempt + 1}/{len(delays)})")
                time.sleep(delays[attempt])
                continue
            raise StageError(clean(f"{what} failed against {endpoint()}: {type(exc).__name__}: {exc}", token)) from None


def commit_exactly(api, repo_id: str, files: list[tuple[str, Path]], message: str, token: str | None, *,
                   description: str | None = None, repo_type: str | None = None, stage: str = "publish"):
    """One commit, on top of the head read just before, making the repo hold exactly `files` (stale files deleted
    in the same commit; unchanged files are skipped by the client, so nothing changed -> no commit).
    Returns (previous head, head after, deleted paths); a head that moved meanwhile is retried from the new head."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    wanted = {rel for rel, _ in files}

    def attempt():
        head = api.repo_info(repo_id, repo_type=repo_type).sha
        stale = [p for p in api.list_repo_files(repo_id, revision=head, repo_type=repo_type)
                 if p not in wanted and p != ".gitattributes"]
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
        info = api.create_commit(repo_id, ops, commit_message=message, commit_description=description,
                                 parent_commit=head, repo_type=repo_type)
        return head, info.oid, stale

    return with_retries(attempt, f"committing to {repo_id}", token, stage=stage)


# ---------------------------------------------------------------- credentials: one token per repo
CREDENTIAL = {"oidc": "Trusted Publisher (OIDC, scoped to this repo)", "token": "HF_TOKEN (stored token)"}


def oidc_available() -> bool:
    """OIDC is asked for and an ID token can be had: given (`HF_OIDC_ID_TOKEN`), or minted by GitHub Actions (a job
    with `id-token: write`) when `HUBFORGE_OIDC=1`. The switch, because the permission alone is not a choice to use
    it: with OIDC on, an existing repo without a Trusted Publisher refuses to publish (see `credential`)."""
    github = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL") and os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    return bool(os.environ.get("HF_OIDC_ID_TOKEN")) or bool(github and os.environ.get("HUBFORGE_OIDC") == "1")


def credential(repo_id: str, repo_type: str = "model", stage: str = "publish") -> tuple[str | None, str]:
    """(token, how) to write `repo_id` with. With OIDC available, the ID token is exchanged for a token scoped to
    this one repo (a Trusted Publisher of it, `how` = "oidc"); a repo that does not exist yet cannot have a
    publisher, so its first publish uses the stored token (`HF_TOKEN` or `hf auth login`; `how` = "token").
    An exchange refused for a repo that exists is an error, not a silent fallback: OIDC was asked for.
    Without OIDC: the stored token. The token never appears in `how` or in an error."""
    from huggingface_hub import get_token

    if os.environ.get("HF_OIDC_RESOURCE"):  # huggingface_hub would use that one repo's token for every request
        raise StageError(f"{stage}: HF_OIDC_RESOURCE is set, which scopes every token huggingface_hub finds to one repo, "
                         "but a publish writes up to four: unset it; hubforge exchanges an ID token per repo by itself "
                         "(HUBFORGE_OIDC=1 in a GitHub job with `id-token: write`, or HF_OIDC_ID_TOKEN)")
    if not oidc_available():
        return get_token(), "token"
    from huggingface_hub import _oidc  # the exchange exactly as huggingface_hub 2.4.0 does it (pinned)

    resource = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type] + repo_id
    given = os.environ.get("HF_OIDC_ID_TOKEN") or None
    try:
        answer = with_retries(lambda: _oidc.oidc_login(resource=resource, subject_token=given, endpoint=endpoint(),
                                                       provider=None if given else _oidc.Provider.GITHUB),
                              f"exchanging the OIDC ID token for a token of {resource}", given, stage=stage)
        return answer["access_token"], "oidc"
    except StageError as exc:
        refused = str(exc)
    stored = get_token()
    exists = with_retries(lambda: api(stored or False).repo_exists(repo_id, repo_type=repo_type),
                          f"checking whether {repo_id} exists", stored, stage=stage)
    if exists:
        raise StageError(f"{stage}: {refused}\nThe {repo_type} repo {repo_id} exists, so it can have a Trusted "
                         "Publisher: add this workflow (repository, workflow file, environment) in the repo's "
                         "Settings -> Trusted Publishers, or unset HUBFORGE_OIDC (and HF_OIDC_ID_TOKEN) to publish with HF_TOKEN")
    if not stored:
        raise StageError(f"{stage}: the {repo_type} repo {repo_id} does not exist yet (or is private and nothing "
                         "here can see it), and a Trusted Publisher can only be added to an existing repo: its "
                         "first publish needs HF_TOKEN with write access")
    return stored, "token"


# ---------------------------------------------------------------- preflight
def write_access(who: dict, namespace: str, repo_id: str | None = None) -> str | None:
    """Why `who` (a whoami answer) cannot write to `namespace` (or to the one repo `repo_id`), or None when it can."""
    access = (who.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        return "the token is read-only (role 'read'); create a token with write access"
    if role == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        if not any((s.get("entity") or {}).get("name") in (namespace, repo_id) and "repo.write" in (s.get("permissions") or []) for s in scoped):
            return f"the fine-grained token has no 'repo.write' permission on {repo_id or namespace!r}"
        if any((s.get("entity") or {}).get("name") == repo_id for s in scoped):
            return None  # scoped to this very repo (a Trusted Publisher token, or a fine-grained one)
    if namespace == who.get("name"):
        return None
    org = next((o for o in who.get("orgs") or [] if o.get("name") == namespace), None)
    if org is None:
        member = ", ".join([who.get("name", "?")] + [o.get("name", "?") for o in who.get("orgs") or []])
        return f"{namespace!r} is neither the token's user nor one of its organisations ({member})"
    if org.get("roleInOrg") == "read":
        return f"the user has only the 'read' role in organisation {namespace!r}"
    return None


def preflight(recipe) -> dict:
    """Checks that must pass before training when publishing: token, write access, repo names, no Xet locally."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    url = endpoint()
    if not is_hf_host(url) and not constants.HF_HUB_DISABLE_XET:  # hf_xet is a hard dependency: Xet would be used
        raise StageError(f"HF_ENDPOINT={url} is not the Hugging Face Hub, and huggingface_hub would upload large files "
                         "with Xet, which a local Hub does not speak: set HF_HUB_DISABLE_XET=1 in the environment before "
                         "starting hubforge (it is read when huggingface_hub is imported)")
    if constants.HF_HUB_OFFLINE:
        raise StageError("HF_HUB_OFFLINE is set, so huggingface_hub refuses every request; unset it to publish")
    repos = products.planned_repos(recipe)
    if recipe.space.enabled:
        repos["space"] = recipe.space.id
    for kind, repo_id in repos.items():
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise StageError(f"publish: {kind} repo name {repo_id!r} is not a legal Hub repo id: {exc}") from None
    if len(set(repos.values())) < len(repos):
        raise StageError(f"publish: two repos share a name ({repos}); give publish.*_repo / space.id distinct names")
    creds = {kind: credential(repo_id, "space" if kind == "space" else "model") for kind, repo_id in repos.items()}
    if any(token is None for token, _ in creds.values()):
        raise StageError(f"no Hugging Face token for {url}: set HF_TOKEN, or log in with `hf auth login`")
    seen: dict[str, dict] = {}  # token -> whoami answer (one call per distinct token)
    for kind, repo_id in repos.items():
        token, how = creds[kind]
        if token not in seen:
            try:
                seen[token] = with_retries(lambda: api(token).whoami(), "checking the token (whoami)", token)
            except StageError as exc:
                raise StageError(f"{exc}\nCheck the token (HF_TOKEN, or `hf auth login`) and HF_ENDPOINT") from None
        who = seen[token]
        problem = write_access(who, repo_id.split("/")[0], repo_id)
        if problem:
            raise StageError(clean(f"publish: no write access for the {kind} repo {repo_id} as user {who.get('name')!r} "
                                   f"on {url}: {problem}. Change publish.namespace or use another token", token))
    first = ([seen[t] for t, how in creds.values() if how == "token"] or list(seen.values()) or [{}])[0]
    return {"endpoint": url, "user": first.get("name"), "repos": repos,
            "credentials": {kind: how for kind, (_, how) in creds.items()},
            "role": ((first.get("auth") or {}).get("accessToken") or {}).get("role")}
