"""HTTP plumbing for the local Hub: bounded request bodies, `Range` headers and presigned URLs.

Bodies are read incrementally (Content-Length or chunked) so an upload of any size uses a fixed amount of
memory; a body that ends early raises ClientGone. Every body has a hard limit set from the route before the route
runs (so before any token is looked at): a declared length over it is a 413 at once, a chunked body is cut at it.
Chunk framing is parsed strictly (hex size of at most 16 digits, CRLF after the data, few trailers); anything else
is a 400. Unread bodies are drained after the answer is chosen, because the client (httpx2) reuses keep-alive
connections and would otherwise read our leftover bytes as a response.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import time

from .errors import ClientGone, HubError, bad_request, too_large

READ_PIECE = 64 * 1024
MAX_CHUNK_LINE = 1024
MAX_TRAILERS = 32
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n$")


class Body:
    """The request body as a stream with a hard size `limit`."""

    def __init__(self, rfile, headers, limit: int):
        self.rfile = rfile
        self.limit = limit
        self.read_bytes = 0
        self._buf = b""
        self._chunk_left = 0
        self._done = False
        self.broken = False  # framing error or over the limit: the connection must close after the answer
        te = (headers.get("Transfer-Encoding") or "").strip().lower()
        if te not in ("", "chunked"):
            self._done = True
            raise bad_request(f"Unsupported Transfer-Encoding: {te[:40]!r} (only chunked)")
        self.chunked = te == "chunked"
        self.length: int | None = None
        if not self.chunked:
            raw = (headers.get("Content-Length") or "0").strip()
            if not raw.isascii() or not raw.isdigit() or len(raw) > 20:  # int() would take "+5", "5_0", " -5"
                self.length, self._done = 0, True
                raise bad_request("Invalid Content-Length")
            self.length = int(raw)
            self._done = self.length == 0

    @property
    def declared(self) -> int | None:
        return self.length

    def check_limit(self, limit: int | None = None) -> None:
        limit = self.limit if limit is None else limit
        if self.length is not None and self.length > limit:
            self.broken = True  # not worth draining: close after the answer
            raise too_large(f"Request body too large: {self.length} bytes (limit {limit})")

    def _raw(self, n: int) -> bytes:
        try:
            if self.chunked:
                return self._raw_chunked(n)
            n = min(n, self.length - self.read_bytes)
            data = self.rfile.read(n) if n > 0 else b""
            if n > 0 and not data:
                raise ClientGone("connection closed mid-body")
            return data
        except OSError as exc:  # timeouts, resets: the client is gone
            raise ClientGone(str(exc)) from None

    def _line(self) -> bytes:
        line = self.rfile.readline(MAX_CHUNK_LINE + 1)
        if len(line) > MAX_CHUNK_LINE:
            self._malformed("chunk header line too long")
        if not line.endswith(b"\n"):
            raise ClientGone("connection closed in chunk header")
        return line

    def _malformed(self, why: str):
        self._done = self.broken = True  # the framing is lost: nothing more can be read from this connection
        raise bad_request(f"Malformed chunked body: {why}")

    def _raw_chunked(self, n: int) -> bytes:
        if self._done:
            return b""
        if self._chunk_left == 0:
            m = _CHUNK_SIZE.match(self._line())
            if not m:
                self._malformed("a chunk size is 1 to 16 hex digits")
            self._chunk_left = int(m.group(1), 16)
            if self.read_bytes + self._chunk_left > self.limit:
                self._done = self.broken = True
                raise too_large(f"Request body too large (limit {self.limit} bytes)")
            if self._chunk_left == 0:
                for _ in range(MAX_TRAILERS):
                    if self._line() in (b"\r\n", b"\n"):
                        self._done = True
                        return b""
                self._malformed("too many trailer lines")
        data = self.rfile.read(min(n, self._chunk_left))
        if not data:
            raise ClientGone("connection closed mid-chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and self.rfile.readline(3) not in (b"\r\n", b"\n"):
            self._malformed("no CRLF after a chunk's data")
        return data

    def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at the end of the body."""
        if self._buf:
            data, self._buf = self._buf[:n], self._buf[n:]
            return data
        if self._done:
            return b""
        data = self._raw(n)
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            self.broken = True
            raise too_large(f"Request body too large (limit {self.limit} bytes)")
        if (self.length is not None and self.read_bytes >= self.length) or (self.chunked and not data):
            self._done = True
        return data

    def readline(self, max_len: int) -> bytes:
        """One line including its newline (or the tail of the body); 413 if longer than max_len."""
        parts, size = [], 0
        while True:
            piece = self.read(READ_PIECE)
            if not piece:
                return b"".join(parts)
            nl = piece.find(b"\n")
            if nl >= 0:
                self._buf = piece[nl + 1:] + self._buf
                piece = piece[:nl + 1]
            parts.append(piece)
            size += len(piece)
            if size > max_len:
                raise too_large(f"Line too long in request body (limit {max_len} bytes)")
            if nl >= 0:
                return b"".join(parts)

    def read_all(self, max_len: int) -> bytes:
        self.check_limit(max_len)
        parts, size = [], 0
        while piece := self.read(READ_PIECE):
            size += len(piece)
            if size > max_len:
                raise too_large(f"Request body too large (limit {max_len} bytes)")
            parts.append(piece)
        return b"".join(parts)

    def finish(self, drain_limit: int) -> bool:
        """Discard what is left of the body; False when the connection must close (too much left, or broken).

        A malformed chunked body raises its 400 here too: the request was not HTTP, whatever the route answered.
        """
        if self.broken:
            return False
        if self._done and not self._buf:
            return True
        if self.length is not None and self.length - self.read_bytes > drain_limit:
            return False
        drained = 0
        try:
            while piece := self.read(READ_PIECE):
                drained += len(piece)
                if drained > drain_limit:
                    return False
        except ClientGone:
            return False
        except HubError as err:
            if err.status == 400:
                raise
            return False
        return True


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`Range` -> inclusive (start, end) or None for the whole file; 416 when unsatisfiable.

    Only single ranges are honoured; anything else is ignored and the whole file is sent (allowed by RFC 9110).
    """
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None
    else:
        suffix = int(last)
        if suffix == 0:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        start, end = max(size - suffix, 0), size - 1
    if start >= size:
        raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def sign(secret: bytes, *parts) -> str:
    msg = "\n".join(str(p) for p in parts).encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def presign_query(secret: bytes, ttl: int, *parts) -> str:
    exp = int(time.time()) + ttl
    return f"exp={exp}&sig={sign(secret, exp, *parts)}"


def check_presigned(secret: bytes, query: dict, *parts) -> None:
    try:
        exp = int(query.get("exp", [""])[0])
    except ValueError:
        raise HubError(403, "Invalid or expired signature") from None
    sig = query.get("sig", [""])[0]
    if exp < time.time() or not hmac.compare_digest(sig, sign(secret, exp, *parts)):
        raise HubError(403, "Invalid or expired signature")
