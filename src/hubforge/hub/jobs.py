"""Jobs on the local Hub: the `/api/jobs/...` routes of `huggingface_hub`'s jobs API, each job a local subprocess.

    api.run_job(image="python:3.11", command=["python", "-c", "print(1)"], secrets={"HF_TOKEN": token})
    api.fetch_job_logs(job_id=..., follow=True); api.inspect_job(...); api.cancel_job(...); api.list_jobs()

On the Hub a job is a container on rented hardware; here it is the job's command run by this server's user in a
scratch folder (`<data_dir>/jobs/<id>/work`, removed when the job ends), in a new process group, with a fresh
HOME/TMPDIR there, and with `environment` and `secrets` as environment variables. The image is recorded and not
pulled: `python` on the job's PATH is the Python running this server (its folder comes first), so a job sees the
packages installed next to the local Hub. `flavor` is recorded; there is one kind of hardware, this machine.
The job also gets `HF_ENDPOINT` (this server), `HF_HUB_DISABLE_XET=1` and `HF_HUB_DISABLE_TELEMETRY=1`, the
local counterpart of a job on the Hub reaching the Hub.

Bounds (`Limits`): `max_running_jobs` at once per server (0 turns jobs off), `timeoutSeconds` at most
`max_job_seconds` (default 30 min when absent), `max_job_log_bytes` of output kept (the rest is counted and
dropped; the process keeps running). Only a write token for the namespace submits or cancels; a token that can
read the namespace inspects, lists and reads logs; anyone else is told the job does not exist. Secret values
are kept in memory only until the process starts, are shown as "***" by inspect and list, and are replaced by
"***" in every log line (values of 4 characters or more, as are `hf_...` tokens; a line is cut every 64 KiB, so a
secret printed across such a cut is not caught). Routes and formats: PROTOCOL.md §9.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import datetime

from .context import Reply, Request, field, json_reply
from .errors import HubError, bad_request
from .spaces import _KEY, _TOKENISH
from .storage import now_iso, read_json, write_json

TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
DEFAULT_TIMEOUT = 30 * 60
KEEPALIVE_S = 20.0   # above the client's 5 s read timeout without follow (it ends the replay), below its 120 s
KILL_GRACE_S = 5.0   # SIGTERM, then SIGKILL to the job's process group
MAX_LINE = 64 * 1024
UNSUPPORTED = ("volumes", "expose", "ssh", "network")
_FLAVOR = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_ID = re.compile(r"^[0-9a-f]{24}$")


def _not_found(job_id: str) -> HubError:
    return HubError(404, f"Job {job_id[:40]} not found")


def _strings(body: dict, key: str, kind: type) -> list | dict:
    value = field(body, key, kind, default=kind())
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        if not isinstance(v, str) or len(v) > MAX_LINE:
            raise bad_request(f"`{key}` must hold strings of at most 64 KiB ({str(k)[:40]} does not)")
        if isinstance(value, dict) and not _KEY.match(k):
            raise bad_request(f"`{key}`: {k[:40]!r} is not a variable name (letters, digits, underscores)")
    return value


class Jobs:
    def __init__(self, hub):
        self.hub, self.root = hub, hub.data_dir / "jobs"
        self._cond = threading.Condition()
        self._live: dict[str, dict] = {}  # job id -> {"proc", "reason"} while its process runs
        for path in self.root.glob("*/job.json"):  # a job running when the server stopped never finishes now
            record = read_json(path)
            if record["status"]["stage"] not in TERMINAL:
                self._finish(record, "ERROR", "the local Hub stopped while the job ran")

    # --- records -------------------------------------------------------------------------------------------------
    def _record(self, job_id: str) -> dict | None:
        return read_json(self.root / job_id / "job.json") if _ID.match(job_id) else None

    def visible(self, req: Request, ns: str, job_id: str, write: bool = False) -> dict:
        ident = req.need_user()
        record = self._record(job_id)
        if record is None or record["owner"]["name"] != ns or not ident.can_read(ns):
            raise _not_found(job_id)  # another namespace's job is reported missing, never forbidden
        if write and not ident.can_write(ns):
            raise HubError(403, f"Cancelling a job of {ns} needs a write token (this one is {ident.scope})")
        return record

    @staticmethod
    def public(record: dict) -> dict:
        def secs(a, b):
            return None if not a else int((datetime.fromisoformat(b or now_iso()) - datetime.fromisoformat(a)).total_seconds())
        durations = {"schedulingSecs": secs(record["createdAt"], record["startedAt"]),
                     "runningSecs": secs(record["startedAt"], record["finishedAt"]),
                     "totalSecs": secs(record["createdAt"], record["finishedAt"])}
        return {**{k: v for k, v in record.items() if k != "timeoutSeconds"}, "durations": durations}

    def _finish(self, record: dict, stage: str, message: str | None) -> None:
        record["status"] = {"stage": stage, "message": message}
        record["finishedAt"] = now_iso()
        write_json(self.root / record["id"] / "job.json", record, mode=0o600)
        shutil.rmtree(self.root / record["id"] / "work", ignore_errors=True)
        with self._cond:
            self._cond.notify_all()

    # --- running -------------------------------------------------------------------------------------------------
    def submit(self, req: Request, ns: str) -> dict:
        ident, limits = req.need_user(), self.hub.limits
        if not ident.can_write(ns):
            raise HubError(403, f"Running a job in {ns} needs a write token for {ns}")
        body = req.json_object()
        for key in UNSUPPORTED:
            if body.get(key):
                raise bad_request(f"`{key}` is not supported by the local Hub's jobs")
        if field(body, "attempts", int, default=1) != 1:
            raise bad_request("`attempts` other than 1 is not supported by the local Hub's jobs")
        command, arguments = _strings(body, "command", list), _strings(body, "arguments", list)
        env, secret_env = _strings(body, "environment", dict), _strings(body, "secrets", dict)
        image, space = field(body, "dockerImage", str), field(body, "spaceId", str)
        flavor = field(body, "flavor", str, default="cpu-basic")
        timeout = field(body, "timeoutSeconds", int, default=DEFAULT_TIMEOUT)
        labels = field(body, "labels", dict, default={})
        if not command:
            raise bad_request("`command` must be a non-empty list of strings")
        if (image is None) == (space is None):
            raise bad_request("give exactly one of `dockerImage` and `spaceId`")
        if not _FLAVOR.match(flavor):
            raise bad_request(f"`flavor` {flavor[:40]!r} is not a hardware flavor name (e.g. cpu-basic, a10g-large)")
        if not 0 < timeout <= limits.max_job_seconds:
            raise bad_request(f"`timeoutSeconds` must be between 1 and {limits.max_job_seconds} on this Hub")
        if not all(isinstance(k, str) and isinstance(v, str) and len(k) + len(v) < 1024 for k, v in labels.items()):
            raise bad_request("`labels` must map strings to strings")
        if limits.max_running_jobs == 0:
            raise HubError(403, "Jobs are turned off on this local Hub (Limits.max_running_jobs=0)")
        job_id = secrets.token_hex(12)
        owner = {"id": hashlib.sha1(ns.encode()).hexdigest()[:24], "name": ns,
                 "type": "user" if ns == ident.name else "org"}
        record = {"id": job_id, "createdAt": now_iso(), "startedAt": None, "finishedAt": None,
                  "dockerImage": image, "spaceId": space, "command": command, "arguments": arguments,
                  "environment": env, "secrets": {k: "***" for k in secret_env}, "flavor": flavor, "labels": labels,
                  "status": {"stage": "RUNNING", "message": None}, "owner": owner, "retry": 0,
                  "initiator": {"type": "user", "id": hashlib.sha1(ident.name.encode()).hexdigest()[:24],
                                "name": ident.name}, "timeoutSeconds": timeout}
        work = self.root / job_id / "work"
        with self._cond:
            if len(self._live) >= limits.max_running_jobs:
                raise HubError(429, f"{len(self._live)} jobs are running on this local Hub (its limit); "
                                    "wait for one to finish or cancel one")
            (work / "tmp").mkdir(parents=True, mode=0o700)
            (self.root / job_id / "logs.ndjson").touch(mode=0o600)
            record["startedAt"] = now_iso()
            write_json(self.root / job_id / "job.json", record, mode=0o600)
            self._live[job_id] = {"proc": None, "reason": None}
        self._start(record, work, {**env, **secret_env}, list(secret_env.values()))
        return self.public(self._record(job_id))

    def _start(self, record: dict, work, job_env: dict, secret_values: list[str]) -> None:
        env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
               "HOME": str(work), "TMPDIR": str(work / "tmp"), "LANG": "C.UTF-8",
               "HF_ENDPOINT": self.hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               **job_env}
        try:
            proc = subprocess.Popen([*record["command"], *record["arguments"]], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:  # like a container whose entry point does not exist
            with self._cond:
                self._live.pop(record["id"], None)
            self._finish(record, "ERROR", f"cannot start {record['command'][0][:80]!r}: {exc.strerror}")
            return
        with self._cond:
            self._live[record["id"]]["proc"] = proc
        reader = threading.Thread(target=self._read, args=(record["id"], proc, secret_values), daemon=True)
        reader.start()
        threading.Thread(target=self._watch, args=(record, proc, reader), daemon=True,
                         name=f"job-{record['id']}").start()

    def _read(self, job_id: str, proc, secret_values: list[str]) -> None:
        kept, dropped, cap = 0, 0, self.hub.limits.max_job_log_bytes
        secret_values = sorted((s for s in secret_values if len(s) >= 4), key=len, reverse=True)
        with open(self.root / job_id / "logs.ndjson", "a", encoding="utf-8") as log:
            for raw in iter(lambda: proc.stdout.readline(MAX_LINE), b""):
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                for value in secret_values:
                    text = text.replace(value, "***")
                line = json.dumps({"data": _TOKENISH.sub("hf_***", text), "timestamp": now_iso()}) + "\n"
                if kept + len(line) > cap:
                    dropped += len(raw)
                    continue
                kept += len(line)
                log.write(line)
                log.flush()
                with self._cond:
                    self._cond.notify_all()
            if dropped:
                log.write(json.dumps({"data": f"[local Hub: {dropped} bytes of output over the {cap}-byte log "
                                              "limit were dropped]", "timestamp": now_iso()}) + "\n")

    def _watch(self, record: dict, proc, reader: threading.Thread) -> None:
        try:
            rc = proc.wait(timeout=record["timeoutSeconds"])
        except subprocess.TimeoutExpired:
            self._signal(record["id"], "timeout")
            rc = proc.wait()
        try:  # like a container: whatever the command left running in its group goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        reader.join()
        with self._cond:
            reason = self._live.pop(record["id"])["reason"]
        if reason == "canceled":
            self._finish(record, "CANCELED", "canceled by the user")
        elif reason is not None:
            self._finish(record, "ERROR", {"timeout": f"timed out after {record['timeoutSeconds']} s",
                                           "stopped": "the local Hub stopped while the job ran"}[reason])
        else:
            self._finish(record, "COMPLETED" if rc == 0 else "ERROR", None if rc == 0 else f"exit code {rc}")

    def _signal(self, job_id: str, reason: str, sig=signal.SIGTERM) -> bool:
        with self._cond:
            live = self._live.get(job_id)
            if live is None or live["proc"] is None or live["proc"].poll() is not None:
                return False
            live["reason"] = live["reason"] or reason
            pid = live["proc"].pid
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        if sig == signal.SIGTERM:
            timer = threading.Timer(KILL_GRACE_S, self._signal, (job_id, reason, signal.SIGKILL))
            timer.daemon = True
            timer.start()
        return True

    def stop_all(self) -> None:
        with self._cond:
            ids = list(self._live)
        for job_id in ids:
            self._signal(job_id, "stopped", signal.SIGKILL)
        deadline = time.monotonic() + 5
        with self._cond:
            while self._live and time.monotonic() < deadline:
                self._cond.wait(0.1)

    # --- logs ----------------------------------------------------------------------------------------------------
    def stream(self, job_id: str, tail: int | None):
        """SSE events: the log so far (or its last `tail` lines), then new lines as they come, until the job ends."""
        with open(self.root / job_id / "logs.ndjson", "rb") as log:
            ended = self._ended(job_id)
            first = log.readlines()
            pending = b"" if not first or first[-1].endswith(b"\n") else first.pop()
            yield b"".join(b"data: " + line + b"\n" for line in deque(first, maxlen=tail) if line.strip())
            quiet_since = time.monotonic()
            while True:
                if ended:
                    return
                ended = self._ended(job_id)  # checked before reading: every line of an ended job is in the file
                chunk, pending = pending + log.read(), b""
                lines = chunk.split(b"\n")
                pending = lines.pop()
                if lines:
                    quiet_since = time.monotonic()
                    yield b"".join(b"data: " + line + b"\n\n" for line in lines if line.strip())
                elif not ended:
                    if time.monotonic() - quiet_since >= KEEPALIVE_S:
                        quiet_since = time.monotonic()
                        yield b": keep-alive\n\n"
                    with self._cond:
                        self._cond.wait(1.0)

    def _ended(self, job_id: str) -> bool:
        with self._cond:
            if job_id in self._live:
                return False
        return self._record(job_id)["status"]["stage"] in TERMINAL


# --- routes --------------------------------------------------------------------------------------------------
def submit_or_list(req: Request, ns: str) -> Reply:
    jobs = req.hub.jobs
    if req.method == "POST":
        return json_reply(jobs.submit(req, ns))
    ident = req.need_user()
    if not ident.can_read(ns):
        raise HubError(404, f"No jobs visible in {ns[:40]} to this token")
    stages = {s.upper() for s in req.query.get("stage", [])}
    labels = [tuple(v.partition("=")[::2]) for v in req.query.get("label", [])]
    found = []
    for path in sorted(jobs.root.glob("*/job.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        record = read_json(path)
        if record["owner"]["name"] == ns and (not stages or record["status"]["stage"] in stages) \
                and all(record["labels"].get(k) == v for k, v in labels):
            found.append(jobs.public(record))
    return json_reply(found)


def inspect(req: Request, ns: str, job_id: str) -> Reply:
    return json_reply(req.hub.jobs.public(req.hub.jobs.visible(req, ns, job_id)))


def cancel(req: Request, ns: str, job_id: str) -> Reply:
    req.hub.jobs.visible(req, ns, job_id, write=True)
    req.hub.jobs._signal(job_id, "canceled")  # an ended job stays as it ended
    return json_reply({})


def logs(req: Request, ns: str, job_id: str) -> Reply:
    req.hub.jobs.visible(req, ns, job_id)
    tail = req.arg("tail")
    if tail is not None and not (tail.isascii() and tail.isdigit() and len(tail) < 10):
        raise bad_request("`tail` must be a non-negative integer")
    return Reply(200, b"", {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                 stream=req.hub.jobs.stream(job_id, None if tail is None else int(tail)))
