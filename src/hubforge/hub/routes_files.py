"""Routes that move file bytes: preupload, the NDJSON commit, the LFS batch API, the "CDN", and /resolve.

Upload path (Xet disabled on the client): preupload decides `regular` (bytes inline, base64, in the commit) or
`lfs` (batch -> presigned PUT of the raw bytes -> commit references the sha256). Preupload answers each existing
file's oid, so the client itself skips unchanged files and, when nothing changed, the whole commit.
Download path: /resolve answers regular files directly and LFS files with a 302 to a presigned `/_cdn/` URL on
another origin (`localhost` <-> `127.0.0.1`), exactly like the Hub's CDN redirect, metadata on the 302. The URL
names the repo and is signed with the repo's `uid`, so it stops working when the repo is deleted (or replaced by
a new repo of the same name). Details and the client's side of each step: PROTOCOL.md.
"""
from __future__ import annotations

import base64
import binascii
import json
import mimetypes
from pathlib import PurePosixPath
from urllib.parse import quote

from .cards import card_for_commit
from .context import PLURAL, PREFIX, Reply, Request, field, json_reply
from .errors import HubError, bad_request, entry_not_found, repo_not_found, too_large
from .httpio import check_presigned, parse_range, presign_query
from .storage import HEX40, HEX64, LFS_SUFFIXES, check_name, check_path, lfs_entry

LFS_MIN_SIZE = 10 * 1024 * 1024
URL_TTL = 3600
PREFIX_TYPE = {None: "model", "": "model", "datasets": "dataset", "spaces": "space"}


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """Like the Hub: big files, binary-looking samples and the default LFS suffixes go to LFS."""
    if size >= LFS_MIN_SIZE or PurePosixPath(path).suffix.lower() in LFS_SUFFIXES or b"\0" in sample:
        return "lfs"
    return "regular"


def preupload(req: Request, kind: str, ns: str, name: str, rev: str) -> Reply:
    meta = req.repo(PLURAL[kind], ns, name, write=True)
    if req.flag("create_pr"):
        raise bad_request("Pull requests are not supported by the local Hub")
    files = field(req.json_object(), "files", list, required=True)
    head, tree = req.hub.storage.tree(meta["type"], meta["id"], rev)
    out = []
    for f in files:
        if not isinstance(f, dict) or type(f.get("size")) is not int or f["size"] < 0:
            raise bad_request("Each file needs a path, an integer size and a base64 sample")
        path = check_path(f.get("path"))
        field(f, "sample", str)
        if f["size"] > req.hub.limits.max_file_bytes:
            raise too_large(f"{path}: {f['size']} bytes exceeds the limit of {req.hub.limits.max_file_bytes}")
        try:
            sample = base64.b64decode(f.get("sample") or "", validate=True)
        except (binascii.Error, TypeError):
            raise bad_request(f"{path}: sample is not valid base64") from None
        mode = upload_mode(path, f["size"], sample)
        item = {"path": path, "uploadMode": mode, "shouldIgnore": False}
        entry = tree.get(path)
        if entry and entry["lfs"] == (mode == "lfs"):
            # The client compares this with its local oid: sha256 for LFS files, git blob sha1 for regular ones.
            item["oid"] = entry["sha256"] if entry["lfs"] else entry["oid"]
        out.append(item)
    return json_reply({"files": out, "commitOid": head})


def _commit_ops(req: Request, meta: dict, pins: list) -> tuple[dict, list]:
    """Parse the NDJSON body line by line (one line in memory at a time), storing inline files as they come."""
    st, limits = req.hub.storage, req.hub.limits
    req.body.check_limit(limits.max_commit_bytes)
    header, ops = None, []
    while line := req.body.readline(limits.max_commit_line_bytes):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key, value = obj["key"], obj["value"]
            if not isinstance(key, str) or not isinstance(value, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise bad_request("Malformed commit line: expected {\"key\": \"...\", \"value\": {...}}") from None
        if header is None:
            if key != "header":
                raise bad_request("The first commit line must be the header")
            header = {k: field(value, k, str) for k in ("summary", "description", "parentCommit")}
        elif key == "file":
            path = check_path(value.get("path"))
            content = field(value, "content", str, required=True)
            encoding = field(value, "encoding", str, choices=("base64", "utf-8"), default="base64")
            try:
                data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode("utf-8")
            except (binascii.Error, UnicodeEncodeError):
                raise bad_request(f"{path}: content is not valid {encoding}") from None
            ops.append(("add", path, st.blobs.put_bytes(data, pins)))
            req.hub.stats.add("inline_bytes_received", len(data))
        elif key == "lfsFile":
            path, oid, size = check_path(value.get("path")), value.get("oid"), field(value, "size", int)
            if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not HEX64.match(oid):
                raise bad_request(f"{path}: expected a sha256 oid")
            if not st.has_lfs(meta["type"], meta["id"], oid):
                raise bad_request(f"{path}: LFS object {oid} was not uploaded to this repo")
            actual = st.blobs.size(oid)
            if size is not None and size != actual:
                raise bad_request(f"{path}: size {size} does not match the uploaded object ({actual} bytes)")
            ops.append(("add", path, lfs_entry(oid, actual)))
        elif key == "deletedFile":
            ops.append(("delete", check_path(value.get("path"))))
        elif key == "deletedFolder":
            ops.append(("delete_folder", check_path(field(value, "path", str, default="").strip("/"))))
        else:
            raise bad_request(f"Unknown commit operation: {key!r}")
    if header is None:
        raise bad_request("Empty commit body")
    return header, ops


def commit(req: Request, kind: str, ns: str, name: str, rev: str) -> Reply:
    meta = req.repo(PLURAL[kind], ns, name, write=True)
    st = req.hub.storage
    if req.flag("create_pr"):
        raise bad_request("Pull requests are not supported by the local Hub")
    st.resolve(meta["type"], meta["id"], rev)  # RevisionNotFound for an unknown revision
    rev = rev.removeprefix("refs/heads/")
    if rev not in st.refs(meta["type"], meta["id"])["branches"]:
        raise bad_request(f"Commits can only be made on a branch, not on {rev!r}")
    with st.blobs.pinned() as pins:  # inline files stay until the commit record that references them is written
        header, ops = _commit_ops(req, meta, pins)
        parent = header["parentCommit"]
        if parent is not None and not HEX40.match(parent):
            raise bad_request("parentCommit must be a 40-character commit id")
        title = (header["summary"] or "").strip() or "Update files"
        oid, created = st.commit(meta["type"], meta["id"], rev, ops, req.identity.name, title,
                                 header["description"] or "", parent, lambda e: card_for_commit(st.blobs, e))
    if created:
        req.hub.stats.add("commits_created", 1)
        if meta["type"] == "space" and rev == "main":
            req.hub.spaces.rebuild(meta["id"])  # like the Hub, a push to a Space's main rebuilds it
    return json_reply({"success": True, "commitOid": oid, "commitMessage": title, "hookOutput": "",
                       "commitUrl": f"{req.base_url}/{PREFIX[meta['type']]}{meta['id']}/commit/{oid}",
                       "pullRequestUrl": None})


def xet_token(req: Request, kind: str, ns: str, name: str, rev: str) -> Reply:
    raise bad_request("Xet storage is not supported by the local Hub: set HF_HUB_DISABLE_XET=1 before importing "
                      "huggingface_hub (LFS files then go through the LFS batch API)")


# --- LFS -----------------------------------------------------------------------------------------------------
def lfs_batch(req: Request, prefix: str | None, ns: str, name: str) -> Reply:
    rtype = PREFIX_TYPE[prefix]
    body = req.json_object()
    op, objects = body.get("operation"), body.get("objects")
    if op not in ("upload", "download") or not isinstance(objects, list):
        raise bad_request("Expected {operation: upload|download, objects: [...]}")
    meta = req.repo(rtype, ns, name, write=op == "upload")
    st, secret = req.hub.storage, req.hub.secret
    out = []
    for o in objects:
        oid, size = (o.get("oid"), o.get("size")) if isinstance(o, dict) else (None, None)
        if not isinstance(oid, str) or not HEX64.match(oid) or type(size) is not int or size < 0:
            out.append({"oid": oid[:100] if isinstance(oid, str) else "", "size": 0,
                        "error": {"code": 422, "message": "Invalid oid or size"}})
        elif size > req.hub.limits.max_file_bytes:
            out.append({"oid": oid, "size": size, "error": {"code": 413, "message": "Object too large"}})
        elif op == "upload":
            item = {"oid": oid, "size": size}
            if not (st.has_lfs(rtype, meta["id"], oid) and st.blobs.size(oid) == size):
                q = presign_query(secret, URL_TTL, "PUT", rtype, ns, name, oid, size)
                href = f"{req.base_url}/_cdn/upload/{rtype}/{ns}/{name}/{oid}?size={size}&{q}"
                item["actions"] = {"upload": {"href": href, "expires_in": URL_TTL}}
            out.append(item)
        elif not st.has_lfs(rtype, meta["id"], oid):
            out.append({"oid": oid, "size": size, "error": {"code": 404, "message": "Object does not exist"}})
        else:
            out.append({"oid": oid, "size": size,
                        "actions": {"download": {"href": cdn_url(req, meta, oid), "expires_in": URL_TTL}}})
    return json_reply({"transfer": "basic", "objects": out, "hash_algo": "sha256"},
                      headers={"Content-Type": "application/vnd.git-lfs+json"})


def cdn_upload(req: Request, rtype: str, ns: str, name: str, oid: str) -> Reply:
    """PUT of one LFS object to its presigned URL: streamed to disk, sha256 and size verified, then kept."""
    size = req.arg("size", "")
    check_presigned(req.hub.secret, req.query, "PUT", rtype, ns, name, oid, size)
    size = int(size)
    st = req.hub.storage
    if st.meta(rtype, f"{check_name(ns)}/{check_name(name)}") is None:
        raise repo_not_found(f"{ns}/{name}", True)
    if req.body.declared is not None and req.body.declared != size:
        raise bad_request(f"Body is {req.body.declared} bytes but the object is {size} bytes")
    with st.blobs.pinned() as pins:  # until the repo's marker references the object
        st.blobs.put_stream(req.body.read, size, pins, expect_sha256=oid,
                            on_chunk=lambda n: req.hub.stats.add("lfs_bytes_received", n), git_oid=False)
        st.mark_lfs(rtype, f"{ns}/{name}", oid)
    return Reply(200, headers={"ETag": f'"{oid}"'})


def cdn_url(req: Request, meta: dict, sha256: str) -> str:
    # Another origin than the API, like the Hub's CDN: the client must not follow the redirect during HEAD and
    # must drop the Authorization header on the GET.
    host = req.headers.get("Host") or req.hub.endpoint.split("://", 1)[1]
    hostname, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    swapped = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}.get(hostname)
    origin = f"{swapped}:{port}" if swapped else host
    rtype, repo_id = meta["type"], meta["id"]
    query = presign_query(req.hub.secret, URL_TTL, "GET", rtype, repo_id, _uid(meta), sha256)
    return f"http://{origin}/_cdn/{rtype}/{repo_id}/{sha256}?{query}"


def _uid(meta: dict) -> str:
    return meta.get("uid") or meta["createdAt"]  # repos created before uids existed


def _file_reply(req: Request, sha256: str, size: int, headers: dict, filename: str) -> Reply:
    rng = parse_range(req.headers.get("Range"), size)
    headers = {**headers, "Accept-Ranges": "bytes",
               "Content-Type": mimetypes.guess_type(filename)[0] or "application/octet-stream",
               "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename)}"}
    path = req.hub.storage.blobs.path(sha256)
    if rng is None:
        return Reply(200, headers=headers, file=path, offset=0, length=size)
    start, end = rng
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return Reply(206, headers=headers, file=path, offset=start, length=end - start + 1)


def cdn_download(req: Request, rtype: str, ns: str, name: str, oid: str) -> Reply:
    st = req.hub.storage
    meta = st.meta(rtype, f"{check_name(ns)}/{check_name(name)}")
    # A deleted repo's URLs die with it: the repo (and its uid, signed into the URL) must still be there.
    check_presigned(req.hub.secret, req.query, "GET", rtype, f"{ns}/{name}", _uid(meta) if meta else "", oid)
    size = st.blobs.size(oid) if meta and st.has_lfs(rtype, meta["id"], oid) else None
    if size is None:
        raise HubError(404, "Object not found")
    return _file_reply(req, oid, size, {"ETag": f'"{oid}"'}, oid)


def resolve(req: Request, prefix: str | None, ns: str, name: str, rev: str, path: str) -> Reply:
    meta = req.repo(PREFIX_TYPE[prefix], ns, name)
    oid, tree = req.hub.storage.tree(meta["type"], meta["id"], rev)
    entry = tree.get(path)
    if entry is None:
        raise entry_not_found(path, oid)
    headers = {"X-Repo-Commit": oid, "ETag": f'"{entry["oid"]}"'}
    if entry["lfs"]:
        headers.update({"Location": cdn_url(req, meta, entry["sha256"]), "X-Linked-Etag": f'"{entry["sha256"]}"',
                        "X-Linked-Size": str(entry["size"])})
        return Reply(302, headers=headers)
    return _file_reply(req, entry["sha256"], entry["size"], headers, PurePosixPath(path).name)
