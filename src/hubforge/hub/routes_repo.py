"""Routes about accounts, repos, refs and listings (everything except moving file bytes).

Response shapes follow PROTOCOL.md (beside this file), sections 2 and 4: only the keys `huggingface_hub` 2.4.0
reads are guaranteed; a few more (downloads, likes, usedStorage) make the objects look like the Hub's. Card
metadata (`cardData`, tags) comes from what the commit stored (cards.py), never from parsing a README here.
"""
from __future__ import annotations

import hashlib

from .cards import front_matter, stored_card
from .context import PLURAL, PREFIX, Reply, Request, field, json_reply
from .errors import HubError, bad_request
from .oauth import check_publishers
from .storage import check_name, lfs_pointer

SDKS = ("gradio", "docker", "static", "streamlit")
REPO_TYPES = tuple(PREFIX)
VISIBILITIES = ("private", "public", "protected")


def _tags(card: dict | None, meta: dict) -> list[str]:
    card = card or {}
    tags = [str(t) for t in card.get("tags") or [] if isinstance(t, (str, int, float))]
    for key, prefix in (("library_name", ""), ("license", "license:"), ("language", ""), ("datasets", "dataset:"),
                        ("base_model", "base_model:")):
        values = card.get(key)
        for v in values if isinstance(values, list) else [values] if values else []:
            tags.append(f"{prefix}{v}")
    if meta["type"] == "space":
        tags.append(meta.get("sdk", "gradio"))
    return list(dict.fromkeys(tags))


def lfs_info(entry: dict) -> dict:
    return {"oid": entry["sha256"], "size": entry["size"],
            "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}


def info_dict(req: Request, meta: dict, rev: str = "main", full: bool = True) -> dict:
    rtype, repo_id = meta["type"], meta["id"]
    st = req.hub.storage
    oid, tree = st.tree(rtype, repo_id, rev)
    head = st.commit_record(rtype, repo_id, oid)
    card = stored_card(st.blobs, head)
    info = {"_id": hashlib.sha1(f"{rtype}/{repo_id}/{meta['createdAt']}".encode()).hexdigest()[:24],
            "id": repo_id, "author": repo_id.split("/")[0], "sha": oid, "lastModified": head["date"],
            "createdAt": meta["createdAt"], "private": meta["private"], "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": _tags(card, meta),
            "usedStorage": sum(e["size"] for e in tree.values())}
    if card is not None:
        info["cardData"] = card
    if full:
        info["siblings"] = [{"rfilename": p, "size": e["size"], "blobId": e["oid"],
                             **({"lfs": {"sha256": e["sha256"], "size": e["size"],
                                         "pointerSize": lfs_info(e)["pointerSize"]}} if e["lfs"] else {})}
                            for p, e in sorted(tree.items())]
    if rtype == "model":
        info["modelId"] = repo_id
        for key in ("library_name", "pipeline_tag"):
            if card and isinstance(card.get(key), str):
                info[key] = card[key]
    elif rtype == "space":
        runtime = req.hub.spaces.runtime(repo_id)
        info.update(sdk=meta.get("sdk"), runtime=runtime, subdomain=repo_id.replace("/", "-").lower(),
                    host=runtime.get("host"))
    return info


# --- account -------------------------------------------------------------------------------------------------
def whoami(req: Request) -> Reply:
    return json_reply(req.hub.users.whoami(req.need_user()))


def agent_harnesses(req: Request) -> Reply:
    return json_reply({"standardEnvVars": [], "harnesses": {}})


def validate_yaml(req: Request) -> Reply:
    try:
        front_matter(field(req.json_object(), "content", str, required=True))
    except (ValueError, HubError) as exc:
        msg = exc.message if isinstance(exc, HubError) else str(exc)
        return json_reply({"errors": [{"message": msg}], "warnings": []}, 400)
    return json_reply({"errors": [], "warnings": []})


# --- repos ---------------------------------------------------------------------------------------------------
def _repo_url(req: Request, rtype: str, repo_id: str) -> str:
    return f"{req.base_url}/{PREFIX[rtype]}{repo_id}"


def create_repo(req: Request) -> Reply:
    ident = req.need_user()
    body = req.json_object()
    rtype = field(body, "type", str, choices=REPO_TYPES, default="model")
    name, org = field(body, "name", str, required=True), field(body, "organization", str)
    ns = org or ident.name
    if "/" in name and not org:
        ns, name = name.split("/", 1)  # legacy clients send "ns/name" as name
    check_name(name, "repo name")
    check_name(ns, "namespace")
    if ns in ("datasets", "spaces", "api", "_cdn"):
        raise bad_request(f"Reserved namespace: {ns}")
    repo_id = f"{ns}/{name}"
    exists = req.hub.storage.meta(rtype, repo_id) is not None
    if not ident.can_write(ns) and not (exists and ident.can_write_repo(rtype, repo_id)):
        raise HubError(403, ident.refusal(f"create a repo under {ns}"))
    if exists:  # the caller can write (hence read) this namespace, or this very repo (`exist_ok` goes on)
        return json_reply({"error": f"You already created this {rtype} repo", "url": _repo_url(req, rtype, repo_id)},
                          409)
    visibility = field(body, "visibility", str, choices=VISIBILITIES)
    private = visibility in ("private", "protected") if visibility else field(body, "private", bool, default=False)
    extra = {}
    if rtype == "space":
        extra["sdk"] = field(body, "sdk", str, required=True, choices=SDKS)
        for key, kind in (("hardware", str), ("sleepTimeSeconds", int), ("variables", list), ("secrets", list)):
            field(body, key, kind)
        for item in (body.get("variables") or []) + (body.get("secrets") or []):
            if not isinstance(item, dict):
                raise bad_request("`variables` and `secrets` are lists of {key, value, description?}")
            field(item, "key", str, required=True), field(item, "value", str), field(item, "description", str)
    req.hub.storage.create_repo(rtype, repo_id, ident.name, private, extra)
    if rtype == "space":
        req.hub.spaces.init_space(repo_id, body)
    return json_reply({"url": _repo_url(req, rtype, repo_id), "name": repo_id, "id": repo_id})


def delete_repo(req: Request) -> Reply:
    body = req.json_object()
    rtype = field(body, "type", str, choices=REPO_TYPES, default="model")
    name = field(body, "name", str, required=True)
    ns = field(body, "organization", str) or req.need_user().name
    req.repo(rtype, ns, name, write=True)
    req.hub.storage.delete_repo(rtype, f"{ns}/{name}")  # also collects the blobs nothing references any more
    if rtype == "space":
        req.hub.spaces.forget(f"{ns}/{name}")
    return json_reply({})


def unsupported(req: Request) -> Reply:
    raise bad_request(f"{req.path} is not supported by the local Hub")


def update_settings(req: Request, kind: str, ns: str, name: str) -> Reply:
    rtype = PLURAL[kind]
    req.repo(rtype, ns, name, write=True)
    body = req.json_object()
    if field(body, "gated", (str, bool)) not in (None, False):
        raise bad_request("Gated repos are not supported by the local Hub")
    changes = {}
    visibility, private = field(body, "visibility", str, choices=VISIBILITIES), field(body, "private", bool)
    if visibility is not None:
        changes["private"] = visibility in ("private", "protected")
    if private is not None:
        changes["private"] = private
    publishers = field(body, "trustedPublishers", list)
    if publishers is not None:
        if req.identity.repo:  # else a workflow could widen who may publish with the token it was just given
            raise HubError(403, req.identity.refusal("change the Trusted Publishers of a repo"))
        changes["trustedPublishers"] = check_publishers(publishers)
    if changes:
        req.hub.storage.update_meta(rtype, f"{ns}/{name}", **changes)
    return json_reply({})


def repo_info(req: Request, kind: str, ns: str, name: str, rev: str = "main") -> Reply:
    meta = req.repo(PLURAL[kind], ns, name)
    return json_reply(info_dict(req, meta, rev or "main"))


def list_repos(req: Request, kind: str) -> Reply:
    rtype, ident = PLURAL[kind], req.identity
    author, search = req.arg("author"), (req.arg("search") or "").lower()
    limit = int(req.arg("limit") or 0) if (req.arg("limit") or "").isdigit() else 0
    out = []
    for meta in req.hub.storage.list_repos(rtype):
        ns = meta["id"].split("/")[0]
        if meta["private"] and not (ident and ident.can_read_repo(rtype, meta["id"])):
            continue
        if (author and ns != author) or (search and search not in meta["id"].lower()):
            continue
        out.append(info_dict(req, meta, full=req.flag("full")))
    out.sort(key=lambda d: d["lastModified"], reverse=True)
    return json_reply(out[:limit] if limit else out)


# --- refs ----------------------------------------------------------------------------------------------------
def list_refs(req: Request, kind: str, ns: str, name: str) -> Reply:
    meta = req.repo(PLURAL[kind], ns, name)
    refs = req.hub.storage.refs(meta["type"], meta["id"])
    out = {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                        for b, oid in sorted(refs["branches"].items())],
           "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": v["target"]}
                    for t, v in sorted(refs["tags"].items())],
           "converts": []}
    if req.flag("include_prs"):
        out["pullRequests"] = []
    return json_reply(out)


def branch(req: Request, kind: str, ns: str, name: str, ref: str) -> Reply:
    meta = req.repo(PLURAL[kind], ns, name, write=True)
    st = req.hub.storage
    if req.method == "DELETE":
        st.delete_ref(meta["type"], meta["id"], "branch", ref)
        return json_reply({})
    start = field(req.json_object(), "startingPoint", str) or "main"
    st.create_ref(meta["type"], meta["id"], "branch", ref, st.resolve(meta["type"], meta["id"], start))
    return json_reply({})


def tag(req: Request, kind: str, ns: str, name: str, ref: str) -> Reply:
    meta = req.repo(PLURAL[kind], ns, name, write=True)
    st = req.hub.storage
    if req.method == "DELETE":
        st.delete_ref(meta["type"], meta["id"], "tag", ref)
        return json_reply({})
    body = req.json_object()
    tag_name, message = field(body, "tag", str, required=True), field(body, "message", str, default="")
    target = st.resolve(meta["type"], meta["id"], ref)
    st.create_ref(meta["type"], meta["id"], "tag", tag_name, target, message)
    return json_reply({})
