"""Trusted Publishers on the local Hub: a CI job's OIDC ID token exchanged for a token scoped to ONE repo.

`POST /oauth/token` (RFC 8693 token exchange, as `huggingface_hub._oidc.exchange_oidc_token` sends it) takes the
ID token, checks it (signature, `iss`, `aud` = this Hub, `exp`), checks that the target repo exists and lists a
Trusted Publisher matching the token's GitHub claims (`repository`, the workflow file of `job_workflow_ref` /
`workflow_ref`, and `environment` when the publisher names one), and answers a token valid for `TOKEN_SECONDS`
that reads and writes that one repo and nothing else (see `auth.Identity.repo`). Anything wrong is
400 `{"error": "invalid_grant", "error_description": ...}`, as the Hub answers.

The test issuer: GitHub signs with RS256, which the standard library cannot verify, so the local Hub trusts an
HS256 (HMAC-SHA256) issuer whose shared key is given at start (`LocalHub(oidc_issuer_key=...)`, or the environment
variable `HUBFORGE_HUB_OIDC_KEY`); without a key every exchange is refused. `mint_id_token` signs one (tests, demo).
Publishers are set with `PUT /api/{models,datasets,spaces}/NS/NAME/settings {"trustedPublishers": [...]}`, by a
full (not exchanged) write token. Issued tokens live in memory only: a restarted Hub forgets them, as they expire
within the hour anyway.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time

from .auth import Identity
from .context import Reply, Request, field, json_reply
from .errors import HubError, bad_request

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_SECONDS = 3600
PUBLISHER_KEYS = {"repository": True, "workflow": True, "environment": False}  # key -> required


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_id_token(key: bytes, claims: dict) -> str:
    """An HS256 JWT with `claims`, as the test issuer would sign it."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def invalid_grant(why: str) -> HubError:
    return HubError(400, why, code="invalid_grant")


def verify(token: str, key: bytes, issuer: str, audiences: set[str], now: float) -> dict:
    """The claims of a valid ID token, else invalid_grant saying what is wrong with it."""
    try:
        head, body, sig = token.split(".")
        header, claims = json.loads(_unb64(head)), json.loads(_unb64(body))
        signature = _unb64(sig)
    except (ValueError, UnicodeDecodeError):
        raise invalid_grant("the subject_token is not a JWT (header.payload.signature)") from None
    if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "HS256":
        raise invalid_grant(f"the ID token is signed with {header.get('alg') if isinstance(header, dict) else '?'}; "
                            "this Hub's test issuer signs with HS256")
    if not hmac.compare_digest(signature, hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()):
        raise invalid_grant("the ID token's signature does not verify against the trusted issuer's key")
    if claims.get("iss") != issuer:
        raise invalid_grant(f"the ID token's issuer {str(claims.get('iss'))[:80]!r} is not trusted (expected {issuer!r})")
    aud = claims.get("aud")
    if not ({aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()) & audiences:
        raise invalid_grant(f"the ID token's audience {str(aud)[:80]!r} is not this Hub ({sorted(audiences)[0]!r})")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or exp <= now:
        raise invalid_grant("the ID token has expired" if isinstance(exp, (int, float)) else "the ID token has no `exp`")
    if isinstance(claims.get("nbf"), (int, float)) and claims["nbf"] > now + 60:
        raise invalid_grant("the ID token is not valid yet (`nbf` in the future)")
    return claims


def publisher_matches(pub: dict, claims: dict) -> bool:
    ref = str(claims.get("job_workflow_ref") or claims.get("workflow_ref") or "")
    workflow = ref.split("@")[0].rsplit("/", 1)[-1]  # owner/repo/.github/workflows/FILE@ref -> FILE
    return (claims.get("repository") == pub["repository"] and workflow == pub["workflow"]
            and (not pub.get("environment") or claims.get("environment") == pub["environment"]))


def check_publishers(value) -> list[dict]:
    """The `trustedPublishers` setting: a list of {repository, workflow, environment?}; 400 naming what is wrong."""
    if not isinstance(value, list):
        raise bad_request("`trustedPublishers` must be a list of {repository, workflow, environment?}")
    out = []
    for i, pub in enumerate(value):
        if not isinstance(pub, dict) or set(pub) - set(PUBLISHER_KEYS):
            raise bad_request(f"`trustedPublishers[{i}]` must be an object with keys {', '.join(PUBLISHER_KEYS)}")
        item = {k: field(pub, k, str, required=req) for k, req in PUBLISHER_KEYS.items()}
        if item["repository"].count("/") != 1 or not item["workflow"].endswith((".yml", ".yaml")):
            raise bad_request(f"`trustedPublishers[{i}]`: repository is 'owner/name' and workflow a file name "
                              "such as 'train-and-publish.yml'")
        out.append({k: v for k, v in item.items() if v})
    return out


def parse_resource(resource: str) -> tuple[str, str]:
    for prefix, rtype in (("datasets/", "dataset"), ("spaces/", "space"), ("models/", "model")):
        if resource.startswith(prefix):
            return rtype, resource[len(prefix):]
    return "model", resource


class Exchange:
    """The trusted issuer and the tokens issued so far (sha256 -> scoped identity, expiry)."""

    def __init__(self, key: bytes | None, issuer: str = GITHUB_ISSUER):
        self.key, self.issuer = key, issuer
        self._lock = threading.Lock()
        self._issued: dict[str, tuple[Identity, float]] = {}

    def issue(self, ident: Identity) -> str:
        token = "hf_oidc_" + secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._issued = {h: v for h, v in self._issued.items() if v[1] > now}  # forget expired ones
            self._issued[hashlib.sha256(token.encode()).hexdigest()] = (ident, now + TOKEN_SECONDS)
        return token

    def identify(self, token: str) -> Identity | None:
        """The scoped identity of an issued token; None for any other token; 401 once it expired."""
        with self._lock:
            found = self._issued.get(hashlib.sha256(token.encode()).hexdigest())
        if found is None:
            return None
        if found[1] <= time.time():
            raise HubError(401, "This Trusted Publisher token has expired; exchange a new ID token at /oauth/token")
        return found[0]


def token_exchange(req: Request) -> Reply:
    """The route. OAuth errors are answered in OAuth's shape, `{"error": code, "error_description": why}`."""
    try:
        return _exchange(req)
    except HubError as err:
        if err.code not in ("invalid_grant", "unsupported_grant_type", "invalid_request"):
            raise
        return json_reply({"error": err.code, "error_description": err.message}, err.status)


def _exchange(req: Request) -> Reply:
    body, ex = req.json_object(), req.hub.oauth
    if field(body, "grant_type", str, required=True) != GRANT_TYPE:
        raise HubError(400, f"grant_type must be {GRANT_TYPE}", code="unsupported_grant_type")
    if field(body, "subject_token_type", str, default=ID_TOKEN_TYPE) != ID_TOKEN_TYPE:
        raise HubError(400, f"subject_token_type must be {ID_TOKEN_TYPE}", code="invalid_request")
    subject, resource = field(body, "subject_token", str, required=True), field(body, "resource", str, required=True)
    if ex.key is None:
        raise invalid_grant("this local Hub trusts no OIDC issuer: start it with HUBFORGE_HUB_OIDC_KEY set")
    claims = verify(subject, ex.key, ex.issuer, {req.hub.endpoint, req.base_url}, time.time())
    rtype, repo_id = parse_resource(resource)
    meta = req.hub.storage.meta(rtype, repo_id) if repo_id.count("/") == 1 else None
    publishers = (meta or {}).get("trustedPublishers") or []
    if not any(publisher_matches(p, claims) for p in publishers):
        # One answer for "no such repo" and "not a publisher of it", so private repo names do not leak.
        raise invalid_grant(f"no Trusted Publisher of {rtype} repo {repo_id!r} matches this ID token (repository "
                            f"{str(claims.get('repository'))[:80]!r}, workflow ref "
                            f"{str(claims.get('job_workflow_ref') or claims.get('workflow_ref'))[:120]!r}, environment "
                            f"{str(claims.get('environment'))[:40]!r}); add one in the repo's settings")
    ident = Identity(repo_id.split("/")[0], "write", repo=(rtype, repo_id))
    return json_reply({"access_token": ex.issue(ident), "token_type": "bearer", "expires_in": TOKEN_SECONDS,
                       "issued_token_type": "urn:ietf:params:oauth:token-type:access_token", "scope": resource})
