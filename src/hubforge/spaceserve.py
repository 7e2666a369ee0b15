"""`hubforge space serve`: the Space app (`space/app.py`) run locally, on a run directory's own files or on repos
of the Hub at HF_ENDPOINT. A CLI feature, not a stage: it publishes nothing and writes nothing into the run.

    hubforge space serve --run-dir runs/<name>/<sha12> [--backend gguf|transformers]
    hubforge space serve --gguf-repo R --gguf-file F | --model-repo R

The app gets the settings the deployed Space gets (hubforge.spacecard.app_settings, from the run's typed resolved
recipe) and, instead of repo ids, the local path of the model it serves.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from hubforge import products, shipped
from hubforge.errors import StageError
from hubforge.recipe import RecipeError, read_resolved
from hubforge.spacecard import app_settings


def run_dir_env(run_dir: Path, backend: str | None = None) -> dict[str, str]:
    """App environment for a run directory's own files (GGUF_PATH / MODEL_PATH): no Hub needed. The paths are
    absolute: the app runs in its own folder, where a path relative to the caller's would point nowhere."""
    run_dir = Path(os.path.abspath(run_dir))
    resolved = run_dir / "recipe.resolved.yaml"
    if not resolved.is_file():
        raise StageError(f"{run_dir} has no recipe.resolved.yaml; pass the folder a `hubforge run` created")
    try:
        recipe = read_resolved(resolved)
    except RecipeError as exc:
        raise StageError(str(exc)) from None
    backend = backend or recipe.space.backend
    env = app_settings(recipe, backend)
    if backend == "gguf":
        path = run_dir / "gguf" / products.gguf_name(recipe, recipe.space.gguf_file)
        env["GGUF_PATH"] = str(path)
    else:
        path = next((p for p in (run_dir / "merge" / "model", run_dir / "train" / "model") if p.is_dir()), run_dir / "merge" / "model")
        env["MODEL_PATH"] = str(path)
    if not path.exists():
        other = "transformers" if backend == "gguf" else "gguf"
        raise StageError(f"{path} does not exist: run the {'gguf' if backend == 'gguf' else 'merge'} stage, or serve with --backend {other}")
    return env


def hub_env(model_repo: str | None = None, gguf_repo: str | None = None, gguf_file: str | None = None,
            adapter_repo: str | None = None, backend: str | None = None) -> dict[str, str]:
    """App environment for repos on a Hub (HF_ENDPOINT picks which Hub)."""
    backend = backend or ("gguf" if gguf_repo else "transformers")
    if backend == "gguf" and not (gguf_repo and gguf_file):
        raise StageError("the gguf backend needs --gguf-repo and --gguf-file (or use --backend transformers --model-repo)")
    if backend == "transformers" and not model_repo:
        raise StageError("the transformers backend needs --model-repo")
    return {k: v for k, v in {"BACKEND": backend, "MODEL_REPO": model_repo, "GGUF_REPO": gguf_repo, "GGUF_FILE": gguf_file,
                              "ADAPTER_REPO": adapter_repo, "TITLE": model_repo or gguf_repo}.items() if v}


def serve(app_env: dict[str, str], *, host: str = "127.0.0.1", port: int = 7860, wait: bool = True):
    """Run `space/app.py` with `app_env` on host:port; returns its exit code (wait) or the running process."""
    env = {**os.environ, **app_env, "GRADIO_SERVER_NAME": host, "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    source = shipped.folder("space")
    process = subprocess.Popen([sys.executable, str(source / "app.py")], env=env, cwd=source)
    if not wait:
        return process
    # Stopping `hubforge space serve` (Ctrl-C or SIGTERM) stops the app with it rather than orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()
