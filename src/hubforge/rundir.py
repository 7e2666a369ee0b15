"""The run directory: where every stage leaves its outputs, and the manifest that says what happened.

    runs/<recipe-name>/<run-id>/
        recipe.resolved.yaml     the recipe with every default filled in (+ its sha256 in the header)
        manifest.json            per stage: status, times, inputs hash, outputs (sha256, size), result; provenance
        <stage>/                 one folder per stage; a stage writes only into its own folder

The manifest is rewritten atomically (temp file + rename) at every state change, so a `kill -9` leaves the
last state on disk: a stage that was `running` under a process that no longer exists reads as `interrupted`.
A lock file stops two runs from sharing one directory.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_LIBRARIES = ("hubforge", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate",
                     "huggingface-hub", "gguf", "llama-cpp-python", "gradio", "lm-eval", "jsonschema", "tokenizers", "safetensors")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def host_facts() -> dict[str, Any]:
    facts = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import psutil

        facts["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch

        facts["cuda"] = torch.cuda.is_available()
        if facts["cuda"]:
            facts["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return facts


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunDir:
    """A run directory and its manifest. Stages get one and write into `stage_dir(name)`."""

    path: Path
    manifest: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path=path)
        if run.manifest_path.exists():
            run.manifest = json.loads(run.manifest_path.read_text("utf-8"))
        run.manifest.setdefault("stages", {})
        return run

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def stage_dir(self, stage: str) -> Path:
        folder = self.path / stage
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def stage(self, name: str) -> dict:
        """The manifest entry of a stage, with a dead `running` entry reported as `interrupted`."""
        entry = dict(self.manifest["stages"].get(name, {"status": "pending"}))
        if entry.get("status") == "running" and not (entry.get("host") == socket.gethostname() and _pid_alive(entry.get("pid"))):
            entry["status"] = "interrupted"
        return entry

    def result(self, name: str) -> dict:
        """What a finished stage returned (empty if it has not run)."""
        return self.manifest["stages"].get(name, {}).get("result", {})

    def save(self) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False, sort_keys=False), "utf-8")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.manifest_path)

    def lock(self):
        """Hold an exclusive lock on the directory for the lifetime of the returned file object."""
        fh = open(self.path / ".lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RuntimeError(f"{self.path} is in use by another hubforge run; wait for it or choose another --run-dir") from None
        return fh

    def record_provenance(self, recipe_sha256: str, recipe_source: str, root: Path) -> None:
        from hubforge import __version__

        self.manifest.update({
            "recipe": {"source": recipe_source, "sha256": recipe_sha256},
            "hubforge_version": __version__,
            "git_commit": git_commit(root),
            "libraries": library_versions(),
            "host": host_facts(),
            "updated_at": now(),
        })
        self.save()

    def mark(self, name: str, **fields: Any) -> None:
        entry = self.manifest["stages"].setdefault(name, {})
        entry.update(fields)
        self.manifest["updated_at"] = now()
        self.save()

    def describe_outputs(self, name: str) -> list[dict]:
        """sha256 and size of every file in a stage's folder (checkpoints are listed too; they are outputs)."""
        folder = self.path / name
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
        return [{"path": str(p.relative_to(self.path)), "sha256": sha256_file(p), "size": p.stat().st_size} for p in files]

    def outputs_intact(self, name: str) -> bool:
        """Every output recorded for a stage still exists with its recorded size (a cheap check before skipping)."""
        for out in self.manifest["stages"].get(name, {}).get("outputs", []):
            p = self.path / out["path"]
            if not p.is_file() or p.stat().st_size != out["size"]:
                return False
        return True

    def outputs_hash(self, name: str) -> str:
        outs = self.manifest["stages"].get(name, {}).get("outputs", [])
        return hashlib.sha256(json.dumps([(o["path"], o["sha256"]) for o in outs]).encode()).hexdigest()


def stage_host_fields() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "argv": [os.path.basename(sys.argv[0])] + sys.argv[1:2]}
