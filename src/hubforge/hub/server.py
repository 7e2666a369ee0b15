"""The local Hub's HTTP server: routing, the request/answer cycle, and the `LocalHub` object.

Stdlib only (`ThreadingHTTPServer`, one thread per connection, HTTP/1.1 keep-alive). Every answer has a
Content-Length, HEAD answers carry no body, unread request bodies are drained (or the connection is closed), and
client mistakes are 4xx with the Hub's `X-Error-Code` / `X-Error-Message` headers; a 5xx would make the client
retry five times with back-off, so it only ever signals a bug here. What each route implements: PROTOCOL.md.

    from hubforge.hub import serve
    with serve(Path("hub-data")) as hub:      # http://127.0.0.1:<free port>
        print(hub.endpoint, (hub.data_dir / "token").read_text())
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from . import routes_files as rf
from . import routes_repo as rr
from . import routes_tree as rt
from . import jobs as jb
from . import oauth
from . import spaces as sp
from .auth import Users
from .context import Reply, Request, json_reply
from .errors import ClientGone, HubError
from .jobs import Jobs
from .spaces import Spaces
from .storage import Storage

log = logging.getLogger("hubforge.hub")


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 50 * 10**9            # one LFS object (and any request body)
    max_json_bytes: int = 8 * 2**20             # JSON API bodies (create, preupload, batch, ...)
    max_commit_bytes: int = 4 * 2**30           # a whole NDJSON commit (inline files are < 10 MB each)
    max_commit_line_bytes: int = 64 * 2**20     # one NDJSON line, i.e. one base64 inline file
    drain_bytes: int = 16 * 2**20               # beyond this an unread body closes the connection instead
    max_running_jobs: int = 2                   # jobs (local subprocesses) at once; 0 turns jobs off (jobs.py)
    max_job_seconds: int = 24 * 3600            # the largest `timeoutSeconds` a job may ask for
    max_job_log_bytes: int = 16 * 2**20         # output kept per job; the rest is dropped (and counted)


class HubStartError(RuntimeError):
    """The server cannot start (port in use, data dir locked or unusable); the message says what to change."""


class Stats:
    """Thread-safe counters (bytes received, commits created) that tests and benchmarks read."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, key: str, n: int) -> None:
        with self._lock:
            self._counts[key] += n

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._counts)


_R = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_T = r"/api/(?P<kind>models|datasets|spaces)/" + _R
_S = r"/api/spaces/" + _R
_J = r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[^/]+)"
# (methods, path pattern, route, body kind): the kind bounds the body before the route runs (context.Request.bound);
# lines without a kind take a JSON body.
ROUTES = [(frozenset(methods.split()), re.compile(pattern), fn, kind[0] if kind else "json")
          for methods, pattern, fn, *kind in [
    ("GET", r"/api/whoami-v2", rr.whoami, "none"),
    ("POST", r"/oauth/token", oauth.token_exchange),
    ("GET", r"/api/agent-harnesses", rr.agent_harnesses, "none"),
    ("POST", r"/api/validate-yaml", rr.validate_yaml),
    ("POST", r"/api/repos/create", rr.create_repo),
    ("DELETE", r"/api/repos/delete", rr.delete_repo),
    ("POST", r"/api/repos/move", rr.unsupported),
    ("GET", r"/api/(?P<kind>models|datasets|spaces)", rr.list_repos, "none"),
    ("GET", _T, rr.repo_info, "none"),
    ("GET", _T + r"/revision/(?P<rev>[^/]+)", rr.repo_info, "none"),
    ("PUT", _T + r"/settings", rr.update_settings),
    ("GET", _T + r"/refs", rr.list_refs, "none"),
    ("POST DELETE", _T + r"/branch/(?P<ref>.+)", rr.branch),
    ("POST DELETE", _T + r"/tag/(?P<ref>.+)", rr.tag),
    ("GET", _T + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", rt.list_tree, "none"),
    ("POST", _T + r"/paths-info/(?P<rev>[^/]+)", rt.paths_info),
    ("GET", _T + r"/commits/(?P<rev>[^/]+)", rt.list_commits, "none"),
    ("POST", _T + r"/preupload/(?P<rev>[^/]+)", rf.preupload),
    ("GET", _T + r"/xet-(?:read|write)-token/(?P<rev>[^/]+)", rf.xet_token, "none"),
    ("POST", _T + r"/commit/(?P<rev>[^/]+)", rf.commit, "commit"),
    ("GET POST DELETE", _S + r"/variables", sp.variables),
    ("GET POST DELETE", _S + r"/secrets", sp.secrets),
    ("GET", _S + r"/runtime", sp.runtime, "none"),
    ("POST", _S + r"/(?P<action>restart|pause|hardware|sleeptime)", sp.action),
    ("GET", _S + r"/logs/(?P<kind>run|build)", sp.logs, "none"),
    ("GET POST", r"/api/jobs/(?P<ns>[^/]+)", jb.submit_or_list),
    ("GET", _J, jb.inspect, "none"),
    ("POST", _J + r"/cancel", jb.cancel, "none"),
    ("GET", _J + r"/logs", jb.logs, "none"),
    ("POST", r"/(?:(?P<prefix>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/batch",
     rf.lfs_batch),
    ("PUT", r"/_cdn/upload/(?P<rtype>model|dataset|space)/" + _R + r"/(?P<oid>[0-9a-f]{64})", rf.cdn_upload, "file"),
    ("GET", r"/_cdn/(?P<rtype>model|dataset|space)/" + _R + r"/(?P<oid>[0-9a-f]{64})", rf.cdn_download, "none"),
    ("GET", r"/(?:(?P<prefix>datasets|spaces)/)?" + _R + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", rf.resolve, "none"),
]]


def _route(method: str, path: str):
    wanted = "GET" if method == "HEAD" else method
    allowed = False
    for methods, pattern, fn, kind in ROUTES:
        m = pattern.fullmatch(path)
        if m:
            if wanted in methods:
                # Split on "/" first (the regex did), then unquote: a revision like refs%2Fpr%2F1 stays one segment.
                return fn, {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}, kind
            allowed = True
    raise HubError(405, f"Method {method} not allowed here") if allowed else HubError(404, f"Not found: {path}")


def _header_safe(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", " ", text)[:1000]


def error_reply(err: HubError) -> Reply:
    headers = dict(err.headers)
    if err.code:
        headers["X-Error-Code"] = err.code
    headers["X-Error-Message"] = _header_safe(err.message)
    return json_reply({"error": err.message}, err.status, headers)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubforge-local-hub/0.1"
    sys_version = ""
    timeout = 120  # seconds a silent client may hold its connection thread

    def setup(self):
        super().setup()
        self.server.hub._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.hub._track(self.connection, add=False)

    def _serve(self):
        hub, req = self.server.hub, None
        try:
            req = Request(self, hub)
            fn, params, kind = _route(self.command, req.path)
            req.bound(kind)  # before the route runs, so before any token is looked at
            reply = fn(req, **params)
        except HubError as err:
            reply = error_reply(err)
        except ClientGone:
            self.close_connection = True  # nothing was kept; nobody is listening for an answer
            return
        except Exception:
            log.exception("internal error on %s %s", self.command, self.path.split("?")[0])
            reply = error_reply(HubError(500, "Internal error in the local Hub"))
        try:
            reusable = req is not None and req.body.finish(hub.limits.drain_bytes)
        except HubError as err:  # malformed chunked framing found while draining: that is the answer
            reply, reusable = error_reply(err), False
        if not reusable:
            reply.headers["Connection"] = "close"
        try:
            self._send(reply)
        except OSError:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _send(self, reply: Reply) -> None:
        if reply.stream is not None:
            return self._send_stream(reply)
        length = reply.length if reply.file is not None else len(reply.body)
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        if reply.file is not None:
            with open(reply.file, "rb") as f:
                self.connection.sendfile(f, reply.offset, length)
        else:
            self.wfile.write(reply.body)

    def _send_stream(self, reply: Reply) -> None:
        # A body of unknown length (a job's log as it grows): chunked, each piece flushed as it comes.
        try:
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                for piece in reply.stream:
                    if piece:  # an empty chunk would end the body
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            reply.stream.close()

    def send_error(self, code, message=None, explain=None):
        # Malformed request lines and the like: answer JSON like everything else, then close.
        body = json_reply({"error": message or HTTPStatus(code).phrase}).body
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # never answer in HTTP/0.9 (no status line) to a garbled request line
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass

    def log_request(self, code="-", size="-"):
        # Paths only: query strings hold presigned signatures; tokens are in headers and never logged.
        log.debug("%s %s -> %s", self.command, (getattr(self, "path", None) or "").split("?")[0], code)

    def log_message(self, format, *args):
        log.debug("%s: %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        log.debug("connection error from %s", client_address, exc_info=True)


class LocalHub:
    """A running local Hub; see `hubforge.hub` for the public API."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 0, *, limits: Limits | None = None,
                 default_user: str = "hubforge", oidc_issuer_key: bytes | None = None):
        self.data_dir = Path(data_dir).resolve()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_file = open(self.data_dir / ".lock", "w")
        except OSError as exc:
            raise HubStartError(f"cannot use {self.data_dir} as the data directory: {exc.strerror}") from None
        # One server per data dir: locks are in-process, and start-up empties tmp/ (another server's uploads).
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise HubStartError(f"{self.data_dir} is already served by another local Hub (it holds "
                                f"{self.data_dir / '.lock'}); stop that one or pass another --data-dir") from None
        try:  # the port next, before anything is written, so a busy port leaves the data dir as it was
            self._httpd = _HTTPServer((host, port), Handler)
        except OSError as exc:
            self._lock_file.close()
            raise HubStartError(f"cannot listen on {host}:{port}: {exc.strerror}; is another server using "
                                "it? Pass another --port") from None
        self._httpd.hub = self
        self.limits = limits or Limits()
        self.storage = Storage(self.data_dir)
        self.users = Users(self.data_dir / "users.json")
        self.spaces = Spaces(self)
        self.jobs = Jobs(self)
        key = oidc_issuer_key or os.environ.get("HUBFORGE_HUB_OIDC_KEY", "").encode() or None
        self.oauth = oauth.Exchange(key)  # Trusted Publishers: which ID tokens /oauth/token accepts
        self.stats = Stats()
        self.secret = self._load_secret()
        if len(self.users) == 0:
            self._write_private(self.data_dir / "token", self.users.create_user(default_user, "write"))
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.storage.collect_garbage()  # blobs left by repos deleted or commits refused before a crash
        self.host, self.port = host, self._httpd.server_address[1]
        self.endpoint = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"
        self._thread: threading.Thread | None = None

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:  # mkstemp creates the file with mode 0600
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load_secret(self) -> bytes:
        # Signs presigned upload/download URLs; persisted so URLs stay valid across a restart.
        path = self.data_dir / "url-signing-key"
        if not path.exists():
            self._write_private(path, secrets.token_hex(32))
        return path.read_text().strip().encode()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> "LocalHub":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"local-hub-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close open keep-alive connections (so clients reconnect to a new server), stop Spaces and jobs."""
        self.spaces.stop_all()
        self.jobs.stop_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._lock_file.close()  # releases the data dir

    def __enter__(self) -> "LocalHub":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- API for the embedding code ------------------------------------------------------------------------------
    @property
    def token_path(self) -> Path:
        return self.data_dir / "token"

    def create_user(self, name: str, scope: str = "write", orgs=()) -> str:
        return self.users.create_user(name, scope, orgs)

    @property
    def on_space_restart(self):
        return self.spaces.on_restart

    @on_space_restart.setter
    def on_space_restart(self, fn) -> None:
        self.spaces.on_restart = fn

    @property
    def on_space_stop(self):
        return self.spaces.on_stop

    @on_space_stop.setter
    def on_space_stop(self, fn) -> None:
        self.spaces.on_stop = fn

    def set_space_runtime(self, repo_id: str, *, stage: str | None = None, error_message: str | None = None,
                          logs=None, **extra) -> dict:
        return self.spaces.set_runtime(repo_id, stage=stage, error_message=error_message, logs=logs, **extra)

    def space_runtime(self, repo_id: str) -> dict:
        return self.spaces.runtime(repo_id)

    def snapshot(self, repo_type: str, repo_id: str, revision: str = "main", dest: Path | None = None) -> Path:
        if self.storage.meta(repo_type, repo_id) is None:
            raise KeyError(f"No such {repo_type} repo: {repo_id}")
        dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="hub-snapshot-"))
        return self.storage.snapshot(repo_type, repo_id, revision, dest)
