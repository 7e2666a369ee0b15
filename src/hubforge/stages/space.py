"""The space stage: deploy the Gradio demo (`space/app.py`) for the published repos and wait until it runs.

    hubforge run RECIPE --stages space                  # or: hubforge space deploy RECIPE --run-dir DIR

Deploy = render the Space files into `<run>/space/`, set the Space variables, upload the files in one commit
(on top of the head just read, retried like publish's), make sure the Space rebuilds, and wait for its runtime to
reach RUNNING; an error stage (or the timeout) stops the stage with the stage name and the tail of the Space's
log. Only this module and `publish` talk to the Hub, both through hubforge.hubclient. (`hubforge space serve`, the
same app locally, is hubforge.spaceserve.)
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from hubforge import hubclient, products, shipped
from hubforge.errors import StageError
from hubforge.recipe import Recipe
from hubforge.redact import redact
from hubforge.rundir import RunDir
from hubforge.spacecard import app_settings, render_space_readme
VARIABLES = ("MODEL_REPO", "GGUF_REPO", "GGUF_FILE", "ADAPTER_REPO", "BACKEND", "SYSTEM_PROMPT", "EXAMPLES", "TITLE", "RTL")
DEPLOY_TIMEOUT_S = 900.0  # a CPU Space building llama-cpp-python takes minutes; HUBFORGE_SPACE_TIMEOUT overrides
LOG_TAIL_LINES = 40
REBUILDING = ("BUILDING", "APP_STARTING", "RUNNING_BUILDING", "RUNNING_APP_STARTING")  # the stages wait_for_space waits through


def gguf_file_name(recipe: Recipe, files: list[str] = ()) -> str:
    """The GGUF the Space serves: `<name>-<TYPE>.gguf` (the gguf stage's naming), as found in the published files."""
    wanted = products.gguf_name(recipe, recipe.space.gguf_file)
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
        **app_settings(recipe, backend),
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
    source, out = shipped.folder("space"), run_dir.stage_dir("space")
    requirements = (source / "requirements.txt").read_text("utf-8")
    (out / "app.py").write_text((source / "app.py").read_text("utf-8"), "utf-8")
    (out / "requirements.txt").write_text(requirements_for(recipe.space.backend, requirements), "utf-8")
    (out / "README.md").write_text(render_space_readme(recipe, run_dir), "utf-8")
    return out


def upload(api, space_id: str, folder: Path, message: str, token: str | None) -> str | None:
    """One commit that makes the repo hold exactly the rendered files; None when nothing changed."""
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    head, oid, _ = hubclient.commit_exactly(api, space_id, files, message, token, repo_type="space", stage="space")
    return oid if oid != head else None


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
    from huggingface_hub import get_token

    space_id = recipe.space.id
    token, how = (api.token or get_token(), "token") if api else hubclient.credential(space_id, "space", stage="space")
    api = api or hubclient.api(token)
    published = run_dir.result("publish")
    if published.get("endpoint") and published["endpoint"].rstrip("/") != api.endpoint.rstrip("/"):
        raise StageError(f"the repos of this run were published to {published['endpoint']}, not to {api.endpoint}: "
                         "publish them there first (hubforge run RECIPE --publish), then deploy the Space")
    variables = space_variables(recipe, published)
    folder = render(recipe, run_dir)
    if not token:
        raise StageError(f"no Hub token: set HF_TOKEN to a write token for {space_id.split('/')[0]} (or run `hf auth login`)")
    hubclient.with_retries(lambda: api.create_repo(space_id, repo_type="space", space_sdk="gradio",
                                                   private=recipe.publish.private, exist_ok=True),
                           f"creating {space_id}", token, stage="space")
    if recipe.space.hardware != "cpu-basic":
        api.request_space_hardware(space_id, recipe.space.hardware)
    # Variables first, so the rebuild that the push starts already sees them.
    set_variables(api, space_id, variables)
    commit = upload(api, space_id, folder, f"Deploy {recipe.name} demo (recipe {recipe.sha256[:12]})", token)
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
    print(f"[space] {space_id}: credential: {hubclient.CREDENTIAL[how]}")
    return {"space_id": space_id, "stage": runtime.stage, "credential": how, "url": f"{api.endpoint}/spaces/{space_id}", "commit": commit,
            "app_url": (runtime.raw or {}).get("host") or getattr(api.space_info(space_id), "host", None),
            "variables": sorted(k for k, v in variables.items() if v), "files": sorted(p.name for p in folder.iterdir())}


# The recipe sections this stage reads (part of its cache key; tests/test_layers.py checks it reads no other).
SECTIONS = ('name', 'base', 'data', 'eval', 'space', 'publish', 'card', 'method', 'train')


def run(recipe: Recipe, run_dir: RunDir, timeout: float | None = None) -> dict:
    if reason := products.space_skip_reason(recipe):
        return {"status": "not_applicable", "reason": reason}
    return deploy(recipe, run_dir, timeout=timeout)
