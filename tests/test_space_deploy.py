"""`hubforge space deploy` against the local Hub, whose Spaces really run (hubforge.space_runner).

Deploy renders the Space, uploads it in one commit, sets the variables and waits for RUNNING; the app then
downloads the GGUF from the local Hub and answers through gradio_client. A broken app ends in RUNTIME_ERROR
with its log tail, at start-up or later.
"""
from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "space"))
from space_testing import PERSIAN_PROMPT, published_gguf_run, stream_chat, tiny_gguf  # noqa: E402,F401

from hubforge.pipeline import StageError  # noqa: E402
from hubforge.stages import space  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.hub]

# Serves 200 for two seconds, then dies: a Space that crashes after it was RUNNING.
LATE_CRASH_APP = """
import http.server, os, threading, time
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["GRADIO_SERVER_PORT"])), http.server.SimpleHTTPRequestHandler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("serving", flush=True)
time.sleep(2)
print("out of memory (simulated)", flush=True)
os._exit(3)
"""


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    from huggingface_hub import HfApi

    from hubforge.hub import serve
    from hubforge.space_runner import SpaceRunner

    hub = serve(tmp_path_factory.mktemp("hub"))
    runner = SpaceRunner.attach(hub, start_timeout=120)
    api = HfApi(endpoint=hub.endpoint, token=hub.token_path.read_text().strip())
    yield hub, api
    runner.stop_all()
    hub.stop()


@pytest.fixture
def published(local_hub, tiny_gguf, make_recipe, tmp_path, monkeypatch):
    """A recipe whose GGUF repo is on the local Hub, and a run directory whose gguf and publish stages say so."""
    from huggingface_hub import constants

    hub, api = local_hub
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the local Hub speaks LFS, not Xet
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # where the Space app's downloads go
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    recipe = make_recipe(name=name, space={"examples": ["سلام"]})
    run_dir = published_gguf_run(api, recipe, tiny_gguf, tmp_path / "run")
    return recipe, run_dir


def test_deploy_reaches_running_and_the_space_answers(local_hub, published):
    hub, api = local_hub
    recipe, run_dir = published
    result = space.deploy(recipe, run_dir, api=api, timeout=120)
    assert result["stage"] == "RUNNING" and result["space_id"] == recipe.space.id
    assert sorted(api.list_repo_files(recipe.space.id, repo_type="space")) == [".gitattributes", "README.md", "app.py",
                                                                               "requirements.txt"]
    readme = (run_dir.path / "space" / "README.md").read_text()
    uploaded = api.hf_hub_download(recipe.space.id, "README.md", repo_type="space", cache_dir=run_dir.path / "dl")
    assert Path(uploaded).read_text() == readme
    card = yaml.safe_load(readme.split("---")[1])
    assert card["sdk"] == "gradio" and card["app_file"] == "app.py" and f"hubforge/{recipe.name}-GGUF" in card["models"]
    variables = {k: v.value for k, v in api.get_space_variables(recipe.space.id).items()}
    assert variables["GGUF_FILE"] == f"{recipe.name}-Q4_K_M.gguf" and variables["RTL"] == "1"

    outputs, final, _, _ = stream_chat(result["app_url"], PERSIAN_PROMPT, max_new_tokens=16)
    assert final.strip() and len(outputs) >= 2
    assert any("model loaded (gguf)" in line for line in api.fetch_space_logs(recipe.space.id))

    commits = len(api.list_repo_commits(recipe.space.id, repo_type="space"))
    again = space.deploy(recipe, run_dir, api=api, timeout=120)  # nothing changed: no new commit, a restart
    assert again["stage"] == "RUNNING" and again["commit"] is None
    assert len(api.list_repo_commits(recipe.space.id, repo_type="space")) == commits


def test_deploy_of_a_space_that_cannot_start_reports_runtime_error_and_log(local_hub, published):
    hub, api = local_hub
    recipe, run_dir = published
    api.delete_file(f"{recipe.name}-Q4_K_M.gguf", f"hubforge/{recipe.name}-GGUF")  # the app will not find its model
    with pytest.raises(StageError) as error:
        space.deploy(recipe, run_dir, api=api, timeout=120)
    message = str(error.value)
    assert "stopped in stage RUNTIME_ERROR" in message and "Exit code: 1" in message
    assert "EntryNotFound" in message or "404" in message, message  # the app's own traceback, from its log


def test_a_space_that_dies_after_running_turns_runtime_error(local_hub):
    hub, api = local_hub
    repo = api.create_repo(f"hubforge/crash-{uuid.uuid4().hex[:6]}", repo_type="space", space_sdk="gradio").repo_id
    api.upload_file(path_or_fileobj=LATE_CRASH_APP.encode(), path_in_repo="app.py", repo_id=repo, repo_type="space")
    assert api.wait_for_space(repo, timeout=60, poll_interval=0.2).stage == "RUNNING"
    deadline = time.monotonic() + 30
    while (runtime := api.get_space_runtime(repo)).stage == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runtime.stage == "RUNTIME_ERROR"
    assert "Exit code: 3" in runtime.raw["errorMessage"] and "out of memory (simulated)" in runtime.raw["errorMessage"]
    assert "out of memory (simulated)\n" in list(api.fetch_space_logs(repo))
