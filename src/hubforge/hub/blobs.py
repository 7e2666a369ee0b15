"""Content-addressed blob store and the atomic file helpers every part of the local Hub writes with.

Blobs live in `<data_dir>/blobs/ab/<sha256>` and are immutable. An upload streams into `<data_dir>/tmp/` in 1 MiB
chunks while its sha256 (and git blob sha1) are computed, is fsynced, verified, and only then renamed into
place, so a dropped connection or a crash never leaves a partial blob under a real name. JSON state files are
replaced the same way (temp file + fsync + rename + fsync of the folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .errors import ClientGone, bad_request

CHUNK = 1 << 20


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj, mode: int = 0o644) -> None:
    """Atomically replace `path` with `obj` as JSON (temp file + fsync + rename + fsync of the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, sort_keys=True, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


class BlobStore:
    """Immutable file contents named by sha256; written by streaming, never held whole in memory."""

    def __init__(self, root: Path):
        self.root = root / "blobs"
        self.tmp = root / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of uploads cut short by a crash
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def put_bytes(self, data: bytes) -> dict:
        pos = 0

        def read(n: int) -> bytes:
            nonlocal pos
            pos += n
            return data[pos - n:pos]
        return self.put_stream(read, len(data))

    def put_stream(self, read: Callable[[int], bytes], size: int, expect_sha256: str | None = None,
                   on_chunk: Callable[[int], None] | None = None, git_oid: bool = True) -> dict:
        """Copy exactly `size` bytes from `read` into the store; returns a tree entry for a regular file.

        The sha256 and the git blob oid are computed while streaming; with `expect_sha256` a mismatch is a 400 and
        nothing is kept. A short read (client gone) raises ClientGone and removes the partial file.
        """
        # The git blob sha1 is only needed for regular files (LFS files are named by their pointer's oid).
        sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size) if git_oid else None
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                remaining = size
                while remaining:
                    chunk = read(min(CHUNK, remaining))
                    if not chunk:
                        raise ClientGone(f"body ended {remaining} bytes early")
                    remaining -= len(chunk)
                    sha256.update(chunk)
                    if sha1 is not None:
                        sha1.update(chunk)
                    f.write(chunk)
                    if on_chunk:
                        on_chunk(len(chunk))
                f.flush()
                os.fsync(f.fileno())
            digest = sha256.hexdigest()
            if expect_sha256 is not None and digest != expect_sha256:
                raise bad_request(f"Content does not match its oid: expected sha256 {expect_sha256}, got {digest}")
            final = self.path(digest)
            if final.exists():
                os.unlink(tmp)
            else:
                final.parent.mkdir(exist_ok=True)
                os.replace(tmp, final)
                fsync_dir(final.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return {"sha256": digest, "size": size, "oid": sha1.hexdigest() if sha1 else None, "lfs": False}


def lfs_entry(sha256: str, size: int) -> dict:
    return {"sha256": sha256, "size": size, "oid": git_blob_oid(lfs_pointer(sha256, size)), "lfs": True}
