"""On-disk storage of the local Hub: content-addressed blobs, repos, commits and refs.

Layout under the data directory (everything survives a restart; nothing lives only in memory):

    blobs/ab/<sha256>                      file contents, named by sha256, immutable
    tmp/                                   uploads in progress (emptied at start-up)
    repos/<type>/<ns>/<name>/repo.json     metadata (private, createdAt, sdk, ...)
    repos/<type>/<ns>/<name>/refs.json     {"branches": {name: oid}, "tags": {name: {"target", "message"}}}
    repos/<type>/<ns>/<name>/commits/<oid>.json   one commit: parents, author, date, title, message, tree, card
    repos/<type>/<ns>/<name>/lfs/<sha256>  marker: this LFS object was uploaded to (or committed in) this repo

Every file is written to a temporary name, fsynced and renamed, so a crash or a dropped connection never leaves a
torn file, and a blob or commit becomes visible only through the atomic rename of `refs.json`. A per-repo lock
serialises commits and ref changes, so two concurrent commits both land, one on top of the other.
`collect_garbage` (at start-up and after a repo is deleted) removes blobs no commit and no LFS upload marker
references any more: those of deleted repos and of refused commits (see blobs.py for why it is safe against a
concurrent commit). An LFS upload that no commit of its repo took within LFS_UPLOAD_GRACE_S (a refused or abandoned
commit) loses its marker then, and so its blob.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

from .blobs import BlobStore, fsync_dir, git_blob_oid, lfs_entry, lfs_pointer, now_iso, read_json, write_json
from .errors import HubError, bad_request, entry_not_found, repo_not_found, revision_not_found

# huggingface_hub uploads LFS objects seconds before the commit that names them; one that no commit of its repo has
# taken a day later belongs to a refused or abandoned commit.
LFS_UPLOAD_GRACE_S = 24 * 3600

__all__ = ["Storage", "BlobStore", "check_name", "check_path", "check_ref", "git_blob_oid", "lfs_entry",
           "lfs_pointer", "now_iso", "read_json", "write_json"]

REPO_TYPES = ("model", "dataset", "space")
CACHE_TREE_ENTRIES = 50_000
HEX40 = re.compile(r"^[0-9a-f]{40}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?$")
_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}$")
# The Hub's default .gitattributes (abridged); the same suffixes decide "lfs" upload mode in preupload.
LFS_SUFFIXES = (".7z .arrow .bin .bz2 .ckpt .ftz .gguf .gz .h5 .joblib .lfs .mlmodel .model .msgpack .npy .npz "
                ".onnx .ot .parquet .pb .pickle .pkl .pt .pth .rar .safetensors .tar .tflite .tgz .wasm .xz .zip "
                ".zst .png .jpg .jpeg .webp .mp3 .wav .ogg").split()
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
GITATTRIBUTES += "*tfevents* filter=lfs diff=lfs merge=lfs -text\n"


def shown(value) -> str:
    """A client's value for an error message: short, and never the repr of a deep structure (RecursionError)."""
    return repr(value[:100]) if isinstance(value, str) else f"a {type(value).__name__}"


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name or name.endswith(".git"):
        raise bad_request(f"Invalid {what}: {shown(name)}")
    return name


def check_ref(name: str) -> str:
    if (not isinstance(name, str) or not _REF.match(name) or ".." in name or "//" in name
            or name.endswith(("/", ".lock")) or HEX40.match(name)):
        raise bad_request(f"Invalid branch or tag name: {shown(name)}")
    return name


def check_path(path: str) -> str:
    """A file path inside a repo: relative, normalised, not touching .git."""
    if not isinstance(path, str) or not 0 < len(path) <= 1024 or "\0" in path or "\\" in path:
        raise bad_request(f"Invalid path in repo: {shown(path)}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise bad_request(f"Invalid path in repo: {shown(path)}")
    return path


def _check_file_dir_conflicts(tree: dict) -> None:
    """Git cannot hold both a file `a` and a file `a/b`."""
    dirs = set()
    for path in tree:
        parts = path.split("/")
        dirs.update("/".join(parts[:k]) for k in range(1, len(parts)))
    clash = dirs.intersection(tree)
    if clash:
        raise bad_request(f"A path is both a file and a folder: {sorted(clash)[0]}")


class Storage:
    """Repos, commits and refs on disk; all mutations of one repo happen under that repo's lock."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.blobs = BlobStore(data_dir)
        self.repos = data_dir / "repos"
        self.repos.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._cache: OrderedDict[tuple, dict] = OrderedDict()  # commits are immutable: safe to cache
        self._cache_entries = 0

    # --- repos -------------------------------------------------------------------------------------------------
    def repo_dir(self, rtype: str, repo_id: str) -> Path:
        ns, name = repo_id.split("/")
        return self.repos / rtype / ns / name

    def lock(self, rtype: str, repo_id: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(f"{rtype}/{repo_id}", threading.RLock())

    def meta(self, rtype: str, repo_id: str) -> dict | None:
        return read_json(self.repo_dir(rtype, repo_id) / "repo.json")

    def update_meta(self, rtype: str, repo_id: str, **changes) -> dict:
        with self.lock(rtype, repo_id):
            meta = self.meta(rtype, repo_id)
            if meta is None:  # deleted meanwhile
                raise repo_not_found(repo_id, True)
            meta.update(changes)
            write_json(self.repo_dir(rtype, repo_id) / "repo.json", meta)
            return meta

    def create_repo(self, rtype: str, repo_id: str, author: str, private: bool, extra: dict | None = None) -> dict:
        """Create the repo with its initial `.gitattributes` commit (like the Hub), atomically via a folder rename."""
        final = self.repo_dir(rtype, repo_id)
        staging = self.blobs.tmp / f"repo-{uuid.uuid4().hex}"
        # `uid` tells this repo from a later one of the same name: presigned URLs are signed with it.
        meta = {"type": rtype, "id": repo_id, "private": bool(private), "createdAt": now_iso(),
                "uid": uuid.uuid4().hex, **(extra or {})}
        write_json(staging / "repo.json", meta)
        with self.blobs.pinned() as pins:  # the record in staging/ is invisible to garbage collection
            entry = self.blobs.put_bytes(GITATTRIBUTES.encode(), pins)
            record = self._new_commit(staging, [], {".gitattributes": entry}, author, "initial commit", "", None)
            write_json(staging / "refs.json", {"branches": {"main": record["id"]}, "tags": {}})
            final.parent.mkdir(parents=True, exist_ok=True)
            with self.lock(rtype, repo_id):
                try:
                    os.rename(staging, final)  # fails on an existing (never empty) repo folder
                except OSError:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise HubError(409, f"You already created this {rtype} repo: {repo_id}") from None
                fsync_dir(final.parent)
        return meta

    def delete_repo(self, rtype: str, repo_id: str) -> None:
        with self.lock(rtype, repo_id):
            trash = self.blobs.tmp / f"deleted-{uuid.uuid4().hex}"
            os.rename(self.repo_dir(rtype, repo_id), trash)  # one atomic step makes the repo disappear
        shutil.rmtree(trash, ignore_errors=True)
        self.collect_garbage()

    def collect_garbage(self) -> int:
        """Remove blobs that no commit of any repo and no live LFS marker references; returns how many were removed."""
        def referenced():
            stale = time.time() - LFS_UPLOAD_GRACE_S
            for repo in self.repos.glob("*/*/*"):
                committed = {e["sha256"] for path in (repo / "commits").glob("*.json")
                             for e in (read_json(path) or {"tree": {}})["tree"].values()}
                yield from committed
                for marker in (repo / "lfs").glob("*"):
                    try:
                        recent = marker.stat().st_mtime >= stale
                    except FileNotFoundError:  # its repo is being deleted
                        continue
                    if marker.name in committed or recent:
                        yield marker.name
                    else:  # uploaded for a commit that was refused or never came: marker and blob go
                        marker.unlink(missing_ok=True)
        return self.blobs.collect(referenced)

    def list_repos(self, rtype: str) -> Iterator[dict]:
        for path in sorted((self.repos / rtype).glob("*/*/repo.json")):
            meta = read_json(path)
            if meta:
                yield meta

    # --- commits and refs --------------------------------------------------------------------------------------
    def refs(self, rtype: str, repo_id: str) -> dict:
        return read_json(self.repo_dir(rtype, repo_id) / "refs.json", {"branches": {}, "tags": {}})

    def _write_refs(self, rtype: str, repo_id: str, refs: dict) -> None:
        # Called under the repo lock; a repo deleted meanwhile must not be resurrected as a bare folder.
        if self.meta(rtype, repo_id) is None:
            raise repo_not_found(repo_id, True)
        write_json(self.repo_dir(rtype, repo_id) / "refs.json", refs)

    def commit_record(self, rtype: str, repo_id: str, oid: str) -> dict | None:
        key = (rtype, repo_id, oid)
        with self._guard:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        record = read_json(self.repo_dir(rtype, repo_id) / "commits" / f"{oid}.json")
        if record is not None:
            with self._guard:
                # Bounded by tree entries, not commits: one commit of a 10k-file repo weighs as much as 10k small ones.
                self._cache[key] = record
                self._cache_entries += len(record["tree"]) + 1
                while self._cache_entries > CACHE_TREE_ENTRIES and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_entries -= len(old["tree"]) + 1
        return record

    def resolve(self, rtype: str, repo_id: str, rev: str) -> str:
        """Branch, tag or full commit id -> commit id; RevisionNotFound otherwise."""
        refs = self.refs(rtype, repo_id)
        name = rev.removeprefix("refs/heads/").removeprefix("refs/tags/")
        if name in refs["branches"]:
            return refs["branches"][name]
        if name in refs["tags"]:
            return refs["tags"][name]["target"]
        if HEX40.match(rev) and (self.repo_dir(rtype, repo_id) / "commits" / f"{rev}.json").exists():
            return rev
        raise revision_not_found(repo_id, rev)

    def tree(self, rtype: str, repo_id: str, rev: str) -> tuple[str, dict]:
        oid = self.resolve(rtype, repo_id, rev)
        return oid, self.commit_record(rtype, repo_id, oid)["tree"]

    def _new_commit(self, repo_dir: Path, parents: list, tree: dict, author: str, title: str, message: str,
                    card: dict | None) -> dict:
        record = {"parents": parents, "author": author, "date": now_iso(), "title": title, "message": message,
                  "tree": tree, "card": card}
        canonical = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        record["id"] = hashlib.sha1(b"commit %d\0" % len(canonical) + canonical).hexdigest()
        write_json(repo_dir / "commits" / f"{record['id']}.json", record)
        return record

    def commit(self, rtype: str, repo_id: str, branch: str, ops: list, author: str, title: str, message: str,
               parent: str | None = None, card_for=lambda entry: None) -> tuple[str, bool]:
        """Apply ops [("add", path, entry) | ("delete", path) | ("delete_folder", path)] on top of `branch`.

        Returns (commit id, created). A stale `parent` is refused with 412; a commit that changes nothing is not
        recorded and returns the current head. `card_for(entry)` gives the card data of a new README.md (or
        raises HubError to refuse the commit); an unchanged README keeps its parent's.
        """
        branch = branch.removeprefix("refs/heads/")
        with self.lock(rtype, repo_id):
            refs = self.refs(rtype, repo_id)
            head = refs["branches"].get(branch)
            if head is None:
                raise revision_not_found(repo_id, branch)
            if parent is not None and parent != head:
                raise HubError(412, f"A commit has happened since the parent commit {parent}; the head of "
                                    f"{branch} is now {head}. Pull and retry.")
            if self.meta(rtype, repo_id) is None:
                raise repo_not_found(repo_id, True)
            head_record = self.commit_record(rtype, repo_id, head)
            old = head_record["tree"]
            tree = dict(old)
            for op in ops:
                if op[0] == "add":
                    tree[op[1]] = op[2]
                elif op[0] == "delete":
                    if tree.pop(op[1], None) is None:
                        raise entry_not_found(op[1], head)
                else:
                    prefix = op[1].rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise entry_not_found(op[1], head)
                    for p in doomed:
                        del tree[p]
            if tree == old:
                return head, False
            _check_file_dir_conflicts(tree)
            readme = tree.get("README.md")
            card = (None if readme is None else head_record.get("card") if readme == old.get("README.md")
                    and "card" in head_record else card_for(readme))
            record = self._new_commit(self.repo_dir(rtype, repo_id), [head], tree, author, title, message, card)
            refs["branches"][branch] = record["id"]
            self._write_refs(rtype, repo_id, refs)
            return record["id"], True

    def history(self, rtype: str, repo_id: str, oid: str, limit: int = 10_000) -> Iterator[dict]:
        """First-parent history, newest first."""
        while oid and limit > 0:
            record = self.commit_record(rtype, repo_id, oid)
            yield record
            oid = record["parents"][0] if record["parents"] else None
            limit -= 1

    def create_ref(self, rtype: str, repo_id: str, kind: str, name: str, target: str, message: str = "") -> None:
        check_ref(name)
        with self.lock(rtype, repo_id):
            refs = self.refs(rtype, repo_id)
            if name in refs["branches"] or name in refs["tags"]:
                raise HubError(409, f"Reference already exists: {name}")
            if kind == "branch":
                refs["branches"][name] = target
            else:
                refs["tags"][name] = {"target": target, "message": message}
            self._write_refs(rtype, repo_id, refs)

    def delete_ref(self, rtype: str, repo_id: str, kind: str, name: str) -> None:
        with self.lock(rtype, repo_id):
            refs = self.refs(rtype, repo_id)
            table = refs["branches" if kind == "branch" else "tags"]
            if kind == "branch" and name == "main":
                raise HubError(403, "Cannot delete the default branch 'main'")
            if name not in table:
                raise revision_not_found(repo_id, name)
            del table[name]
            self._write_refs(rtype, repo_id, refs)

    # --- LFS objects per repo (so an oid alone never grants access to another repo's bytes) --------------------
    def mark_lfs(self, rtype: str, repo_id: str, sha256: str) -> None:
        marker = self.repo_dir(rtype, repo_id) / "lfs" / sha256
        try:
            marker.parent.mkdir(exist_ok=True)
            marker.touch()
        except FileNotFoundError:  # the repo was deleted during the upload
            raise HubError(404, f"Repository deleted: {repo_id}", code="RepoNotFound") from None

    def has_lfs(self, rtype: str, repo_id: str, sha256: str) -> bool:
        return (self.repo_dir(rtype, repo_id) / "lfs" / sha256).exists() and self.blobs.size(sha256) is not None

    def snapshot(self, rtype: str, repo_id: str, rev: str, dest: Path) -> Path:
        """Copy the files of `rev` into `dest` (created; existing files with the same names are replaced)."""
        _, tree = self.tree(rtype, repo_id, rev)
        dest = Path(dest)
        for path, entry in tree.items():
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.blobs.path(entry["sha256"]), target)
        return dest
