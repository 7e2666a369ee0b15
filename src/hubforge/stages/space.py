"""The space stage: deploy the Gradio demo (`space/app.py`) for the published repos and wait until it runs.

    hubforge run RECIPE --stages space                  # or: hubforge space deploy RECIPE --run-dir DIR
    hubforge space serve --run-dir DIR                  # the same app, locally, on the run's own files

Deploy = render the Space files into `<run>/space/`, set the Space variables, upload the files in one commit,
make sure the Space rebuilds, and wait for its runtime to reach RUNNING; an error stage (or the timeout) stops the
stage with the stage name and the tail of the Space's log. Only this module and `publish` talk to the Hub.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from hubforge.pipeline import StageError
from hubforge.recipe import Recipe
from hubforge.redact import redact
from hubforge.rundir import RunDir

SPACE_SRC = Path(__file__).resolve().parents[3] / "space"  # the app ships beside the package, not inside it
VARIABLES = ("MODEL_REPO", "GGUF_REPO", "GGUF_FILE", "ADAPTER_REPO", "BACKEND", "SYSTEM_PROMPT", "EXAMPLES", "TITLE", "RTL")
DEPLOY_TIMEOUT_S = 900.0  # a CPU Space building llama-cpp-python takes minutes; HUBFORGE_SPACE_TIMEOUT overrides
LOG_TAIL_LINES = 40
REBUILDING = ("BUILDING", "APP_STARTING", "RUNNING_BUILDING", "RUNNING_APP_STARTING")  # the stages wait_for_space waits through


def gguf_file_name(recipe: Recipe, files: list[str] = ()) -> str:
    """The GGUF the Space serves: `<name>-<TYPE>.gguf` (the gguf stage's naming), as found in the published files."""
    wanted = f"{recipe.name}-{recipe.space.gguf_file}.gguf"
    matches = [f for f in files if Path(f).name.lower() == wanted.lower()]
    return matches[0] if matches else wanted


def space_variables(recipe: Recipe, published: dict) -> dict[str, str]:
    """The Space variables the app reads, from the recipe and the publish stage's result ({repos: {kind: {...}}})."""
    repos = published.get("repos") or {}
    backend = recipe.space.backend
    need = {"gguf": "gguf", "transformers": "merged"}[backend]
    if need not in repos:
        raise StageError(f"space.backend is {backend!r} but no {need} repo was published (publish result: "
                         f"{sorted(repos) or 'nothing'}); publish it first, or set space.backend to "
                         f"{'transformers' if backend == 'gguf' else 'gguf'} in the recipe")
    gguf = repos.get("gguf") or {}
    values = {
        "MODEL_REPO": (repos.get("merged") or {}).get("repo_id", ""),
        "GGUF_REPO": gguf.get("repo_id", ""),
        "GGUF_FILE": gguf_file_name(recipe, gguf.get("files") or []) if gguf else "",
        "ADAPTER_REPO": (repos.get("adapter") or {}).get("repo_id", ""),
        "BACKEND": backend,
        "SYSTEM_PROMPT": recipe.space.system_prompt or recipe.data.system_prompt or "",
        "EXAMPLES": json.dumps(list(recipe.space.examples or recipe.eval.prompts), ensure_ascii=False),
        "TITLE": recipe.space.title,
        "RTL": "1" if recipe.space.rtl else "0",
    }
    if backend == "gguf" and gguf.get("files") and values["GGUF_FILE"] not in gguf["files"]:
        raise StageError(f"space.gguf_file {recipe.space.gguf_file!r}: {values['GGUF_FILE']} is not in {gguf['repo_id']} "
                         f"(published: {', '.join(gguf['files'])}); pick one of export.gguf.quants")
    return values


def requirements_for(backend: str, text: str) -> str:
    """requirements.txt for one backend: lines tagged `# backend: X` are kept only for backend X."""
    kept = []
    for line in text.splitlines():
        tag = re.search(r"#\s*backend:\s*(\w+)", line)
        if tag is None or tag.group(1) == backend:
            kept.append(line)
    return "\n".join(kept) + "\n"


def render(recipe: Recipe, run_dir: RunDir) -> Path:
    """Write the Space's files into `<run>/space/`: the app, its backend's requirements, the README (card stage's)."""
    from hubforge.stages.card import render_space_readme

    out = run_dir.stage_dir("space")
    requirements = (SPACE_SRC / "requirements.txt").read_text("utf-8")
    (out / "app.py").write_text((SPACE_SRC / "app.py").read_text("utf-8"), "utf-8")
    (out / "requirements.txt").write_text(requirements_for(recipe.space.backend, requirements), "utf-8")
    (out / "README.md").write_text(render_space_readme(recipe, run_dir), "utf-8")
    return out


def upload(api, space_id: str, folder: Path, message: str) -> str | None:
    """One commit that makes the repo hold exactly the rendered files; None when nothing changed."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    stale = set(api.list_repo_files(space_id, repo_type="space")) - set(files) - {".gitattributes"}
    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=folder / f) for f in files]
    ops += [CommitOperationDelete(path_in_repo=f) for f in sorted(stale)]
    before = api.space_info(space_id).sha
    info = api.create_commit(space_id, ops, commit_message=message, repo_type="space")
    return info.oid if info.oid != before else None


def set_variables(api, space_id: str, values: dict[str, str]) -> None:
    current = {k: v.value for k, v in api.get_space_variables(space_id).items()}
    for key in VARIABLES:
        if values.get(key) and current.get(key) != values[key]:
            api.add_space_variable(space_id, key, values[key])
        elif not values.get(key) and key in current:  # an empty variable would read as "set" in the app
            api.delete_space_variable(space_id, key)


def log_tail(api, space_id: str, runtime) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        lines = "".join(api.fetch_space_logs(space_id)).splitlines()[-LOG_TAIL_LINES:]
    except (HfHubHTTPError, OSError):
        lines = []
    message = (runtime.raw or {}).get("errorMessage") or ""
    return redact("\n".join(filter(None, [message, *lines])))


def deploy(recipe: Recipe, run_dir: RunDir, *, api=None, timeout: float | None = None) -> dict:
    timeout = timeout or float(os.environ.get("HUBFORGE_SPACE_TIMEOUT") or DEPLOY_TIMEOUT_S)
    from huggingface_hub import HfApi, get_token

    space_id = recipe.space.id
    variables = space_variables(recipe, run_dir.result("publish"))
    folder = render(recipe, run_dir)
    api = api or HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now: tests and CLIs set it late
    if not (api.token or get_token()):
        raise StageError(f"no Hub token: set HF_TOKEN to a write token for {space_id.split('/')[0]} (or run `hf auth login`)")
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=recipe.publish.private, exist_ok=True)
    if recipe.space.hardware != "cpu-basic":
        api.request_space_hardware(space_id, recipe.space.hardware)
    # Variables first, so the rebuild that the push starts already sees them.
    set_variables(api, space_id, variables)
    commit = upload(api, space_id, folder, f"Deploy {recipe.name} demo (recipe {recipe.sha256[:12]})")
    if commit is None or api.get_space_runtime(space_id).stage not in REBUILDING:
        api.restart_space(space_id)  # unchanged files, or a Hub that has not noticed the push yet
    try:
        runtime = api.wait_for_space(space_id, timeout=timeout, poll_interval=1.0)
    except TimeoutError:
        runtime = api.get_space_runtime(space_id)
        raise StageError(f"Space {space_id} is still {runtime.stage} after {timeout:.0f}s (raise HUBFORGE_SPACE_TIMEOUT); "
                         f"log tail:\n{log_tail(api, space_id, runtime)}") from None
    if runtime.stage != "RUNNING":
        raise StageError(f"Space {space_id} stopped in stage {runtime.stage}; log tail:\n{log_tail(api, space_id, runtime)}")
    return {"space_id": space_id, "stage": runtime.stage, "url": f"{api.endpoint}/spaces/{space_id}", "commit": commit,
            "app_url": (runtime.raw or {}).get("host") or getattr(api.space_info(space_id), "host", None),
            "variables": sorted(k for k, v in variables.items() if v), "files": sorted(p.name for p in folder.iterdir())}


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    if not recipe.space.enabled:
        return {"status": "not_applicable", "reason": "space.enabled is false"}
    return deploy(recipe, run_dir)


# --- hubforge space serve -------------------------------------------------------------------------------------------

def run_dir_env(run_dir: Path, backend: str | None = None) -> dict[str, str]:
    """App environment for a run directory's own files (GGUF_PATH / MODEL_PATH): no Hub needed."""
    run_dir = Path(run_dir)
    resolved = run_dir / "recipe.resolved.yaml"
    if not resolved.is_file():
        raise StageError(f"{run_dir} has no recipe.resolved.yaml; pass the folder a `hubforge run` created")
    recipe = yaml.safe_load(resolved.read_text("utf-8"))
    space, backend = recipe["space"], backend or recipe["space"]["backend"]
    env = {"BACKEND": backend, "TITLE": space["title"], "RTL": "1" if space["rtl"] else "0",
           "SYSTEM_PROMPT": space["system_prompt"] or recipe["data"].get("system_prompt") or "",
           "EXAMPLES": json.dumps(space["examples"] or recipe["eval"]["prompts"], ensure_ascii=False)}
    if backend == "gguf":
        path = run_dir / "gguf" / f"{recipe['name']}-{space['gguf_file']}.gguf"
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
    process = subprocess.Popen([sys.executable, str(SPACE_SRC / "app.py")], env=env, cwd=SPACE_SRC)
    if not wait:
        return process
    # Stopping `hubforge space serve` (Ctrl-C or SIGTERM) stops the app with it rather than orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()
