"""Routes that list a revision's files and history: tree, paths-info and commits.

Tree items follow PROTOCOL.md §4: files carry the git oid (of the LFS pointer for LFS
files) and real size, plus `lfs {oid, size, pointerSize}`; no `xetHash`, so clients always download over HTTP.
`lastCommit` (with expand=true) is found by walking first-parent history, newest first.
"""
from __future__ import annotations

import hashlib
from urllib.parse import parse_qs

from .context import PLURAL, Reply, Request, field, json_reply
from .errors import bad_request, entry_not_found
from .routes_repo import lfs_info


def _file_item(path: str, e: dict) -> dict:
    item = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
    if e["lfs"]:
        item["lfs"] = lfs_info(e)
    return item


def _dir_item(path: str, commit: str) -> dict:
    return {"type": "directory", "oid": hashlib.sha1(f"{commit}:{path}".encode()).hexdigest(), "size": 0,
            "path": path}


def _last_commits(req: Request, meta: dict, oid: str, items: list[dict]) -> None:
    """Attach lastCommit {id, title, date} to tree items: the newest commit that changed the path (or, for a
    folder, anything under it). Walks first-parent history two commits at a time and stops when all are found."""
    wanted = {item["path"]: item for item in items}
    pending = set(wanted)
    history = req.hub.storage.history(meta["type"], meta["id"], oid, limit=1000)
    commit = next(history, None)
    while commit is not None and pending:
        parent = next(history, None)
        before, after = (parent["tree"] if parent else {}), commit["tree"]
        touched = set()
        for path in after.keys() | before.keys():
            if after.get(path) != before.get(path):
                parts = path.split("/")
                touched.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
        for path in pending & touched:
            wanted[path]["lastCommit"] = {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
        pending -= touched
        commit = parent


def list_tree(req: Request, kind: str, ns: str, name: str, rev: str, path: str | None = None) -> Reply:
    meta = req.repo(PLURAL[kind], ns, name)
    oid, tree = req.hub.storage.tree(meta["type"], meta["id"], rev)
    base = (path or "").strip("/")
    prefix = base + "/" if base else ""
    recursive = req.flag("recursive")
    if base and base in tree:
        raise entry_not_found(base, oid)
    files, dirs = [], set()
    for p in sorted(tree):
        if not p.startswith(prefix):
            continue
        rest = p[len(prefix):].split("/")
        if recursive:
            files.append(_file_item(p, tree[p]))
            dirs.update(prefix + "/".join(rest[:i]) for i in range(1, len(rest)))
        elif len(rest) == 1:
            files.append(_file_item(p, tree[p]))
        else:
            dirs.add(prefix + rest[0])
    if base and not files and not dirs:
        raise entry_not_found(base, oid)
    items = [_dir_item(d, oid) for d in sorted(dirs)] + files
    if req.flag("expand"):
        _last_commits(req, meta, oid, items)
    return json_reply(items)


def paths_info(req: Request, kind: str, ns: str, name: str, rev: str) -> Reply:
    meta = req.repo(PLURAL[kind], ns, name)
    if "json" in (req.headers.get("Content-Type") or ""):
        data = req.json_object()
        paths, expand = field(data, "paths", list, default=[]), field(data, "expand", bool, default=False)
        if not all(isinstance(p, str) for p in paths):
            raise bad_request("`paths` must be a list of strings")
    else:
        try:
            form = parse_qs(req.content.decode(), keep_blank_values=True, strict_parsing=False)
        except (ValueError, UnicodeDecodeError):
            raise bad_request("Malformed paths-info body") from None
        paths, expand = form.get("paths", []), (form.get("expand") or ["false"])[0].lower() == "true"
    oid, tree = req.hub.storage.tree(meta["type"], meta["id"], rev)
    items = []
    for p in paths:
        p = p.strip("/")
        if p in tree:
            items.append(_file_item(p, tree[p]))
        elif any(k.startswith(p + "/") for k in tree):
            items.append(_dir_item(p, oid))
    if expand:
        _last_commits(req, meta, oid, items)
    return json_reply(items)


def list_commits(req: Request, kind: str, ns: str, name: str, rev: str) -> Reply:
    meta = req.repo(PLURAL[kind], ns, name)
    oid = req.hub.storage.resolve(meta["type"], meta["id"], rev)
    return json_reply([{"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                        "authors": [{"user": c["author"]}], "parents": c["parents"]}
                       for c in req.hub.storage.history(meta["type"], meta["id"], oid)])
