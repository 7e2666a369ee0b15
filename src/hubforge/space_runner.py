"""Runs the Spaces of the local Hub: on a push or restart, `python app.py` from the Space's snapshot on a free port.

    from hubforge.hub import serve
    from hubforge.space_runner import attach
    hub = serve(data_dir)
    runner = attach(hub)                    # pushes and restart_space now start the app; hub.stop() stops them

Like a Space on the Hub, the app gets the Space variables and secrets as its environment (plus HF_ENDPOINT = this
Hub, so it downloads its model from here) and installs nothing: it runs in the current Python environment. The
runtime goes BUILDING (set by the Hub) -> APP_STARTING -> RUNNING once the app's port answers HTTP 200, or
RUNTIME_ERROR with the log tail when the process exits, before or after that. The app's output is the Space's
run log (`HfApi.fetch_space_logs`); the app's URL is the runtime's `host`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

# The deployer's own credentials and offline switches are not the Space's: a Space sees only its secrets.
NOT_INHERITED = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE",
                 "GRADIO_SERVER_PORT", "GRADIO_SERVER_NAME", "MODEL_PATH", "GGUF_PATH")
ERROR_TAIL_LINES = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_file(snapshot_dir: Path) -> str:
    """`app_file` from the README front matter, else Gradio's default `app.py`."""
    readme = snapshot_dir / "README.md"
    if readme.is_file():
        text = readme.read_text("utf-8", errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and meta.get("app_file"):
                return str(meta["app_file"])
    return "app.py"


def app_env(base: dict, variables: dict, secrets: dict, *, endpoint: str, port: int, repo_id: str) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in NOT_INHERITED}
    env.update(variables)
    env.update(secrets)
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), SPACE_ID=repo_id, PYTHONUNBUFFERED="1")
    return env


def answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through a proxy
    try:
        with opener.open(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@dataclass
class App:
    process: subprocess.Popen
    log_path: Path
    url: str
    sent: int = 0  # bytes of the log already handed to the Hub
    stopping: bool = False

    def new_log_lines(self) -> str:
        with open(self.log_path, "rb") as fh:
            fh.seek(self.sent)
            data = fh.read()
        cut = data.rfind(b"\n") + 1 if self.process.poll() is None else len(data)  # whole lines while it runs
        self.sent += cut
        return data[:cut].decode("utf-8", errors="replace")

    def tail(self, n: int = ERROR_TAIL_LINES) -> str:
        return "\n".join(self.log_path.read_text("utf-8", errors="replace").splitlines()[-n:])


class SpaceRunner:
    def __init__(self, hub, *, start_timeout: float = 300.0, python: str = sys.executable):
        self.hub, self.start_timeout, self.python = hub, start_timeout, python
        self.log_dir = Path(tempfile.mkdtemp(prefix="hubforge-spaces-"))
        self.apps: dict[str, App] = {}
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, hub, **kwargs) -> "SpaceRunner":
        runner = cls(hub, **kwargs)
        hub.on_space_restart = runner.restart
        hub.on_space_stop = runner.stop
        return runner

    def restart(self, repo_id: str, snapshot_dir: Path, variables: dict, secrets: dict) -> dict:
        """The Hub's restart hook (runs in its build thread): start the app and wait until it answers or dies."""
        self.stop(repo_id)
        port = free_port()
        log_path = self.log_dir / f"{repo_id.replace('/', '--')}-{port}.log"
        env = app_env(os.environ, variables, secrets, endpoint=self.hub.endpoint, port=port, repo_id=repo_id)
        with open(log_path, "wb") as log:
            process = subprocess.Popen([self.python, app_file(Path(snapshot_dir))], cwd=snapshot_dir, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        app = App(process, log_path, f"http://127.0.0.1:{port}")
        with self._lock:
            self.apps[repo_id] = app
        self.hub.set_space_runtime(repo_id, stage="APP_STARTING")
        deadline, ready = time.monotonic() + self.start_timeout, False
        while process.poll() is None and time.monotonic() < deadline:
            if ready := answers(app.url + "/"):
                break
            time.sleep(0.25)
        if not ready:
            if process.poll() is None:
                self._kill(app)
                message = f"The app did not answer on its port within {self.start_timeout:.0f}s. Log tail:\n{app.tail()}"
            else:
                message = self._exit_message(app)
            self.hub.set_space_runtime(repo_id, logs=app.new_log_lines())
            return {"stage": "RUNTIME_ERROR", "errorMessage": message}
        self.hub.set_space_runtime(repo_id, logs=app.new_log_lines())
        threading.Thread(target=self._watch, args=(repo_id, app), daemon=True, name=f"space-watch-{repo_id}").start()
        return {"stage": "RUNNING", "host": app.url}

    def _watch(self, repo_id: str, app: App) -> None:
        """Forward the log while the app runs; an exit that nobody asked for is a RUNTIME_ERROR."""
        while app.process.poll() is None:
            time.sleep(1.0)
            if lines := app.new_log_lines():
                self.hub.set_space_runtime(repo_id, logs=lines)
        lines = app.new_log_lines()
        if not app.stopping:
            self.hub.set_space_runtime(repo_id, stage="RUNTIME_ERROR", error_message=self._exit_message(app), logs=lines)

    @staticmethod
    def _exit_message(app: App) -> str:
        return f"Exit code: {app.process.returncode}. Log tail:\n{app.tail()}"

    def stop(self, repo_id: str) -> None:
        """The Hub's stop hook (pause, delete, hub.stop) and the first step of a restart."""
        with self._lock:
            app = self.apps.pop(repo_id, None)
        if app is not None:
            self._kill(app)

    def stop_all(self) -> None:
        for repo_id in list(self.apps):
            self.stop(repo_id)

    @staticmethod
    def _kill(app: App) -> None:
        app.stopping = True
        if app.process.poll() is None:
            os.killpg(app.process.pid, signal.SIGTERM)  # the app's own session: its helper processes go too
            try:
                app.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(app.process.pid, signal.SIGKILL)
                app.process.wait()


def attach(hub, **kwargs) -> SpaceRunner:
    """Make `hub` run its Spaces (see the module docstring); returns the runner."""
    return SpaceRunner.attach(hub, **kwargs)
