"""Spaces on the local Hub: variables, secrets, hardware, and the runtime state driven by a restart hook.

The Hub only records Space state; *running* an app is delegated to a callback set by the embedding code:

    hub.on_space_restart = fn(repo_id, snapshot_dir, variables, secrets) -> runtime dict (e.g. {"stage": "RUNNING"})
    hub.on_space_stop = fn(repo_id)            # optional: pause, delete, hub.stop()

A push to a Space's `main` and `restart_space` both trigger a rebuild, like on the Hub: the stage becomes
BUILDING at once and the callback runs in a background thread on a fresh copy of the files (one build at a
time per Space; a build superseded by a newer push is skipped). Its returned dict is merged into the runtime
(`stage`, `errorMessage`, and any extra keys such as `host`); it may also call `hub.set_space_runtime` later.
If the callback raises, the stage is RUNTIME_ERROR with the (redacted) message.
Without a callback nothing is launched and the stage is RUNNING (or NO_APP_FILE when the app file is missing),
so tools that wait for RUNNING do not hang. Variables and secrets persist in `space.json` (mode 0600); the
runtime stage lives in memory (after a Hub restart a Space is STOPPED until restarted, or RUNNING without hook).
"""
from __future__ import annotations

import json
import re
import shutil
import threading
from collections import deque

from .cards import stored_card
from .context import Reply, Request, field, json_reply
from .errors import bad_request, repo_not_found
from .storage import now_iso, read_json, write_json

APP_FILES = {"gradio": "app.py", "streamlit": "app.py", "docker": "Dockerfile", "static": "index.html"}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_TOKENISH = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")


class Spaces:
    def __init__(self, hub):
        self.hub = hub
        self.on_restart = None
        self.on_stop = None
        self._lock = threading.Lock()
        self._state: dict[str, dict] = {}
        self._logs: dict[str, deque] = {}
        self._gen: dict[str, int] = {}
        self._build_locks: dict[str, threading.Lock] = {}

    # --- persisted settings ------------------------------------------------------------------------------------
    def _file(self, repo_id: str):
        return self.hub.storage.repo_dir("space", repo_id) / "space.json"

    def settings(self, repo_id: str) -> dict:
        return read_json(self._file(repo_id), {"variables": {}, "secrets": {}, "hardware": "cpu-basic",
                                                "sleepTime": None})

    def _update(self, repo_id: str, fn) -> dict:
        with self.hub.storage.lock("space", repo_id):
            if self.hub.storage.meta("space", repo_id) is None:  # deleted meanwhile: do not resurrect its folder
                raise repo_not_found(repo_id, True)
            data = self.settings(repo_id)
            fn(data)
            write_json(self._file(repo_id), data, mode=0o600)  # secrets inside: owner-only
            return data

    def init_space(self, repo_id: str, body: dict) -> None:
        def apply(data):
            for table in ("variables", "secrets"):
                for item in body.get(table) or []:
                    if isinstance(item, dict) and isinstance(item.get("key"), str) and _KEY.match(item["key"]):
                        data[table][item["key"]] = {"value": field(item, "value", str, default=""),
                                                    "description": field(item, "description", str),
                                                    "updatedAt": now_iso()}
            data["hardware"] = field(body, "hardware", str, default=data["hardware"])
            data["sleepTime"] = field(body, "sleepTimeSeconds", int, default=data["sleepTime"])
        self._update(repo_id, apply)

    # --- runtime -----------------------------------------------------------------------------------------------
    def _has_app_file(self, repo_id: str) -> bool:
        """Whether `main` has the app file: `app_file` from the README front matter, else the SDK's default."""
        st = self.hub.storage
        meta = st.meta("space", repo_id)
        oid, tree = st.tree("space", repo_id, "main")
        card = stored_card(st.blobs, st.commit_record("space", repo_id, oid)) or {}
        app_file = card.get("app_file") if isinstance(card.get("app_file"), str) else None
        return (app_file or APP_FILES.get(meta.get("sdk"), "app.py")) in tree

    def runtime(self, repo_id: str) -> dict:
        with self._lock:
            state = dict(self._state.get(repo_id) or {})
        if "stage" not in state:
            state["stage"] = ("NO_APP_FILE" if not self._has_app_file(repo_id)
                              else "STOPPED" if self.on_restart else "RUNNING")
        s = self.settings(repo_id)
        return {"stage": state.pop("stage"), "hardware": {"current": s["hardware"], "requested": s["hardware"]},
                "gcTimeout": s["sleepTime"], "storage": None, "devMode": False, "hotReloading": None,
                "volumes": None, "errorMessage": state.pop("errorMessage", None), **state}

    def set_runtime(self, repo_id: str, stage=None, error_message=None, logs=None, **extra) -> dict:
        with self._lock:
            state = self._state.setdefault(repo_id, {})
            if stage is not None:
                state["stage"] = str(stage)
                state["errorMessage"] = error_message
            elif error_message is not None:
                state["errorMessage"] = error_message
            state.update({k: v for k, v in extra.items() if k not in ("hardware", "gcTimeout")})
            if logs:
                log = self._logs.setdefault(repo_id, deque(maxlen=10_000))
                for line in (logs.splitlines() if isinstance(logs, str) else logs):
                    log.append((now_iso(), str(line)))
        return self.runtime(repo_id)

    def logs(self, repo_id: str) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._logs.get(repo_id, ()))

    def forget(self, repo_id: str) -> None:
        self._call_stop(repo_id)
        with self._lock:
            self._state.pop(repo_id, None)
            self._logs.pop(repo_id, None)
            self._gen[repo_id] = self._gen.get(repo_id, 0) + 1  # cancels a queued build

    def _call_stop(self, repo_id: str) -> None:
        if self.on_stop is not None:
            try:
                self.on_stop(repo_id)
            except Exception:  # a failing stop hook must not break the request; the state says what happened
                self.set_runtime(repo_id, stage="RUNTIME_ERROR", error_message="stop hook failed")

    def stop_all(self) -> None:
        with self._lock:
            ids = list(self._state)
        for repo_id in ids:
            self._call_stop(repo_id)

    def rebuild(self, repo_id: str) -> dict:
        if not self._has_app_file(repo_id):
            return self.set_runtime(repo_id, stage="NO_APP_FILE")
        if self.on_restart is None:
            return self.set_runtime(repo_id, stage="RUNNING")
        with self._lock:
            gen = self._gen[repo_id] = self._gen.get(repo_id, 0) + 1
            build_lock = self._build_locks.setdefault(repo_id, threading.Lock())
        runtime = self.set_runtime(repo_id, stage="BUILDING")
        threading.Thread(target=self._build, args=(repo_id, gen, build_lock), daemon=True,
                         name=f"space-build-{repo_id}").start()
        return runtime

    def _build(self, repo_id: str, gen: int, build_lock: threading.Lock) -> None:
        with build_lock:
            if self._gen.get(repo_id) != gen:
                return  # a newer push or restart superseded this build
            s = self.settings(repo_id)
            secrets = {k: v["value"] for k, v in s["secrets"].items()}
            try:
                oid, _ = self.hub.storage.tree("space", repo_id, "main")
                dest = self.hub.data_dir / "space-runs" / repo_id / oid
                if not dest.exists():
                    tmp = dest.with_name(f".{oid}.partial")
                    shutil.rmtree(tmp, ignore_errors=True)
                    self.hub.storage.snapshot("space", repo_id, oid, tmp)
                    tmp.rename(dest)
                # Keep this snapshot and the newest older one (the app still running until the hook replaces it).
                older = sorted((p for p in dest.parent.iterdir() if p != dest), key=lambda p: p.stat().st_mtime)
                for old in older[:-1]:
                    shutil.rmtree(old, ignore_errors=True)
                result = self.on_restart(repo_id, dest, {k: v["value"] for k, v in s["variables"].items()}, secrets)
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                for value in secrets.values():
                    if len(value) >= 4:
                        msg = msg.replace(value, "***")
                self.set_runtime(repo_id, stage="RUNTIME_ERROR", error_message=_TOKENISH.sub("hf_***", msg))
                return
            if isinstance(result, dict) and self._gen.get(repo_id) == gen:
                result = dict(result)
                stage = result.pop("stage", "RUNNING")
                err = result.pop("errorMessage", result.pop("error_message", None))
                self.set_runtime(repo_id, stage=stage, error_message=err, **result)


# --- routes --------------------------------------------------------------------------------------------------
def _table(req: Request, ns: str, name: str, table: str) -> Reply:
    repo_id = f"{ns}/{name}"
    spaces = req.hub.spaces
    req.repo("space", ns, name, write=req.method != "GET" or table == "secrets")
    if req.method in ("POST", "DELETE"):
        body = req.json_object()
        key = body.get("key")
        if not isinstance(key, str) or not _KEY.match(key):
            raise bad_request("Invalid key: letters, digits and underscores, not starting with a digit")

        def apply(data):
            if req.method == "DELETE":
                data[table].pop(key, None)
            else:
                value = field(body, "value", str, default="")
                if len(value) > 65536:
                    raise bad_request("value must be a string of at most 64 KiB")
                data[table][key] = {"value": value, "description": field(body, "description", str),
                                    "updatedAt": now_iso()}
        spaces._update(repo_id, apply)
        if table == "secrets":
            return json_reply({})
    items = spaces.settings(repo_id)[table]
    if table == "secrets":  # values never leave the server
        return json_reply({k: {"description": v.get("description"), "updatedAt": v["updatedAt"]}
                           for k, v in items.items()})
    return json_reply(items)


def variables(req: Request, ns: str, name: str) -> Reply:
    return _table(req, ns, name, "variables")


def secrets(req: Request, ns: str, name: str) -> Reply:
    return _table(req, ns, name, "secrets")


def runtime(req: Request, ns: str, name: str) -> Reply:
    req.repo("space", ns, name)
    return json_reply(req.hub.spaces.runtime(f"{ns}/{name}"))


def action(req: Request, ns: str, name: str, action: str) -> Reply:
    repo_id, spaces = f"{ns}/{name}", req.hub.spaces
    req.repo("space", ns, name, write=True)
    body = req.json_object() if action in ("hardware", "sleeptime") else {}
    if action == "restart":
        return json_reply(spaces.rebuild(repo_id))
    if action == "pause":
        spaces._call_stop(repo_id)
        return json_reply(spaces.set_runtime(repo_id, stage="PAUSED"))
    if action == "hardware":
        flavor = field(body, "flavor", str, required=True)
        spaces._update(repo_id, lambda d: d.update(hardware=flavor))
    seconds = field(body, "seconds", int) if action == "sleeptime" else field(body, "sleepTimeSeconds", int)
    if action == "sleeptime" and seconds is None:
        raise bad_request("`seconds` is required")
    if seconds is not None:
        spaces._update(repo_id, lambda d: d.update(sleepTime=seconds))
    return json_reply(spaces.runtime(repo_id))


def logs(req: Request, ns: str, name: str, kind: str) -> Reply:
    """Server-sent events like the Hub's log stream; the buffered lines are sent and the stream ends."""
    req.repo("space", ns, name, write=True)
    lines = req.hub.spaces.logs(f"{ns}/{name}") if kind == "run" else []
    body = "".join(f"data: {json.dumps({'data': text + chr(10), 'timestamp': ts})}\n\n" for ts, text in lines)
    return Reply(200, body.encode(), {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
