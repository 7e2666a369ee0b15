"""Publish bookkeeping across Hubs: the endpoint is an input of the publishing stages, and the manifest never says a
run is published or deployed on a Hub it was not.

Two real local Hubs; `hubforge run --publish` as a real process (the unmodified huggingface_hub client inside),
killed with SIGKILL half-way through a publish to the second Hub, then run again there.

    .venv/bin/python -m pytest tests/test_publish_endpoints.py -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubforge import hubclient, pipeline
from hubforge.rundir import RunDir

pytestmark = pytest.mark.hub

RECIPE = """name: endpoint-test
base: {model: ./base}
data: {files: [data/chat.jsonl], format: messages}
method: {name: prompt_tuning}
card: {languages: [fa], description: endpoint bookkeeping test}
"""


@pytest.fixture
def hubs(tmp_path):
    from hubforge.hub import serve

    servers = [serve(tmp_path / f"hub-{name}") for name in ("a", "b")]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def project(tmp_path) -> Path:
    """A project with a recipe and a run directory whose train and card stages are done (prompt tuning: one repo)."""
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "pyproject.toml").touch()
    (root / "data" / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "سلام"}]}\n', "utf-8")
    (root / "recipe.yaml").write_text(RECIPE, "utf-8")
    run = RunDir.open(root / "run")
    adapter = run.stage_dir("train") / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(64 * 1024))
    (run.stage_dir("card") / "adapter").mkdir()
    (run.path / "card" / "adapter" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# endpoint-test\n", "utf-8")
    for name, status, result in (("train", "done", {"adapter_dir": "train/adapter"}),
                                 ("merge", "not_applicable", {"status": "not_applicable", "reason": "virtual tokens"}),
                                 ("gguf", "not_applicable", {"status": "not_applicable", "reason": "nothing merged"}),
                                 ("card", "done", {"cards": {"adapter": "card/adapter/README.md"}, "validated": True})):
        run.mark(name, status=status, result=result, outputs=run.describe_outputs(name))
    return root


def hubforge(project: Path, hub, *args: str, wait: bool = True):
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token_path.read_text().strip(),
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(project / f".hf-{hub.port}"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, "-m", "hubforge.cli", *args]
    if not wait:
        return subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)


def kill_while_publishing(process: subprocess.Popen, manifest: Path) -> None:
    """SIGKILL `process` as soon as the manifest shows its publish stage running (a crash, not a clean stop)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            entry = json.loads(manifest.read_text("utf-8"))["stages"].get("publish", {})
        except (OSError, ValueError):  # replaced atomically, but may not exist yet
            entry = {}
        if entry.get("status") == "running" and entry.get("pid") == process.pid:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            return
        assert process.poll() is None, "the publish finished before it could be killed"
        time.sleep(0.002)
    process.kill()
    pytest.fail("the publish stage never started")


def test_a_publish_to_another_hub_is_its_own_and_a_killed_one_shows_nothing_stale(hubs, project):
    from huggingface_hub import HfApi

    hub_a, hub_b = hubs
    first = hubforge(project, hub_a, "run", "recipe.yaml", "--publish", "--stages", "publish", "--run-dir", "run")
    assert first.returncode == 0, first.stderr
    on_a = RunDir.open(project / "run").result("publish")
    assert on_a["endpoint"] == hub_a.endpoint
    # As if the Space had been deployed on Hub A by that run (deploying one is test_space_deploy's business).
    RunDir.open(project / "run").mark("space", status="done", endpoint=hub_a.endpoint,
                                      result={"space_id": "hubforge/endpoint-test-demo", "stage": "RUNNING"})

    killed = hubforge(project, hub_b, "run", "recipe.yaml", "--publish", "--stages", "publish", "--run-dir", "run", wait=False)
    kill_while_publishing(killed, project / "run" / "manifest.json")
    run = RunDir.open(project / "run")
    publish = run.stage("publish")
    assert publish["status"] == "interrupted" and publish["endpoint"] == hub_b.endpoint
    assert publish["result"] == {}  # not Hub A's commits under Hub B's name
    assert publish["earlier"][hub_a.endpoint]["result"]["repos"] == on_a["repos"]  # what went to Hub A stays on record
    space = run.stage("space")
    assert space["status"] == "outdated" and hub_b.endpoint in space["outdated_by"]
    status = hubforge(project, hub_b, "status", "run")
    assert f"space     outdated        " in status.stdout and "publish   interrupted" in status.stdout

    again = hubforge(project, hub_b, "run", "recipe.yaml", "--publish", "--stages", "publish", "--run-dir", "run")
    assert again.returncode == 0, again.stderr
    run = RunDir.open(project / "run")
    on_b = run.result("publish")
    assert on_b["endpoint"] == hub_b.endpoint and run.stage("publish")["earlier"][hub_a.endpoint]["result"]["repos"] == on_a["repos"]
    repo = on_b["repos"]["adapter"]["repo_id"]
    commit_b = on_b["repos"]["adapter"]["commit"]
    assert commit_b in {c.commit_id for c in HfApi(endpoint=hub_b.endpoint).list_repo_commits(repo)}
    assert commit_b not in {c.commit_id for c in HfApi(endpoint=hub_a.endpoint).list_repo_commits(repo)}

    # The Space is deployed only where the repos it serves were published.
    refused = hubforge(project, hub_a, "space", "deploy", "recipe.yaml", "--run-dir", "run")
    assert refused.returncode == 1
    assert f"published to {hub_b.endpoint}, not to {hub_a.endpoint}" in refused.stderr and "Traceback" not in refused.stderr
    assert not HfApi(endpoint=hub_a.endpoint).repo_exists("hubforge/endpoint-test-demo", repo_type="space")


def test_the_endpoint_is_an_input_of_the_publishing_stages_only(project, monkeypatch):
    from hubforge.recipe import load_recipe

    recipe, run = load_recipe(project / "recipe.yaml"), RunDir.open(project / "run")
    digests = {}
    for endpoint in ("http://127.0.0.1:1", "http://127.0.0.1:2"):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert hubclient.endpoint() == endpoint
        digests[endpoint] = {s.name: pipeline.inputs_hash(s, recipe, run) for s in pipeline.STAGES}
    changed = {name for name in digests["http://127.0.0.1:1"] if digests["http://127.0.0.1:1"][name] != digests["http://127.0.0.1:2"][name]}
    assert changed == {"publish", "space"}
    assert [s.name for s in pipeline.dependants("card")] == ["publish", "space"]
