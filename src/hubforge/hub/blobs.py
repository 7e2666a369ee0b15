"""Content-addressed blob store and the atomic file helpers every part of the local Hub writes with.

Blobs live in `<data_dir>/blobs/ab/<sha256>` and are immutable. An upload streams into `<data_dir>/tmp/` in 1 MiB
chunks while its sha256 (and git blob sha1) are computed, is fsynced, verified, and only then renamed into
place, so a dropped connection or a crash never leaves a partial blob under a real name. JSON state files are
replaced the same way (temp file + fsync + rename + fsync of the folder).

Blobs are shared between repos and removed only by `collect` (garbage collection), which keeps everything the
caller says is referenced plus every *pinned* blob. A request that stores blobs pins them (`with store.pinned()
as pins`) from the moment they are renamed into place until its commit record (which references them) is
written; pinning and renaming happen under the same lock as collection, so a commit racing a collection either
finishes its rename before the collection looks (and is pinned) or after it (and writes a fresh file).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
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
        self._gc_lock = threading.Lock()
        self._pins: Counter = Counter()

    @contextmanager
    def pinned(self):
        """A list that `put_*` calls append their digests to; those blobs survive collection until the block ends."""
        pins: list[str] = []
        try:
            yield pins
        finally:
            with self._gc_lock:
                self._pins.subtract(pins)
                self._pins = +self._pins  # drop zero counts

    def collect(self, referenced) -> int:
        """Remove every blob not in `referenced()` (called with the lock held) and not pinned; returns how many."""
        removed = 0
        with self._gc_lock:
            keep = set(referenced()) | set(self._pins)
            for path in self.root.glob("??/*"):
                if path.name not in keep:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def put_bytes(self, data: bytes, pins: list[str]) -> dict:
        pos = 0

        def read(n: int) -> bytes:
            nonlocal pos
            pos += n
            return data[pos - n:pos]
        return self.put_stream(read, len(data), pins)

    def put_stream(self, read: Callable[[int], bytes], size: int, pins: list[str], expect_sha256: str | None = None,
                   on_chunk: Callable[[int], None] | None = None, git_oid: bool = True) -> dict:
        """Copy exactly `size` bytes from `read` into the store; returns a tree entry for a regular file.

        The blob is pinned (its digest appended to `pins`, from `pinned()`) before it becomes visible.

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
            with self._gc_lock:
                self._pins[digest] += 1
                pins.append(digest)
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
