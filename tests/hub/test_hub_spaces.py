"""Spaces (variables, secrets, runtime, restart hook, logs) and the small JSON endpoints of the local Hub."""
from __future__ import annotations

import http.client
import json
import threading
import uuid

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

pytestmark = pytest.mark.hub

APP = "import gradio as gr\n\ngr.Interface(lambda s: s, 'text', 'text').launch()\n"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_space_variables_secrets_runtime_and_restart_hook(api, hub):
    calls, released = [], threading.Event()

    def on_restart(repo_id, snapshot_dir, variables, secrets):
        calls.append((repo_id, sorted(p.name for p in snapshot_dir.iterdir()), variables, secrets))
        released.wait(10)
        return {"stage": "RUNNING", "host": "http://127.0.0.1:7860"}

    repo = api.create_repo(_name("space"), repo_type="space", space_sdk="gradio",
                           space_variables=[{"key": "MODEL", "value": "m1"}]).repo_id
    assert api.get_space_runtime(repo).stage == "NO_APP_FILE"
    api.add_space_variable(repo, "TEMPERATURE", "0.7", description="sampling")
    api.add_space_secret(repo, "API_KEY", "s3cr3t-value")
    assert {k: v.value for k, v in api.get_space_variables(repo).items()} == {"MODEL": "m1", "TEMPERATURE": "0.7"}
    secrets = api.get_space_secrets(repo)
    assert list(secrets) == ["API_KEY"] and "s3cr3t-value" not in json.dumps(str(secrets))
    api.delete_space_variable(repo, "MODEL")

    hub.on_space_restart = on_restart
    try:
        api.upload_file(path_or_fileobj=APP.encode(), path_in_repo="app.py", repo_id=repo, repo_type="space")
        assert api.get_space_runtime(repo).stage == "BUILDING"  # a push rebuilds, like on the Hub
        released.set()
        runtime = api.wait_for_space(repo, timeout=10, poll_interval=0.05)
        assert runtime.stage == "RUNNING" and runtime.raw["host"] == "http://127.0.0.1:7860"
        assert calls[0] == (repo, [".gitattributes", "app.py"], {"TEMPERATURE": "0.7"}, {"API_KEY": "s3cr3t-value"})

        assert api.restart_space(repo).stage == "BUILDING"
        assert api.wait_for_space(repo, timeout=10, poll_interval=0.05).stage == "RUNNING"
        assert len(calls) == 2
        info = api.space_info(repo)
        assert info.sdk == "gradio" and info.runtime.stage == "RUNNING"

        hub.set_space_runtime(repo, stage="RUNTIME_ERROR", error_message="boom", logs="line one\nline two")
        runtime = api.get_space_runtime(repo)
        assert (runtime.stage, runtime.raw["errorMessage"]) == ("RUNTIME_ERROR", "boom")
        assert list(api.fetch_space_logs(repo)) == ["line one\n", "line two\n"]
        assert api.request_space_hardware(repo, "cpu-upgrade").hardware == "cpu-upgrade"
        assert api.pause_space(repo).stage == "PAUSED"
    finally:
        hub.on_space_restart = None

    snap = hub.snapshot("space", repo, dest=hub.data_dir.parent / f"snap-{uuid.uuid4().hex[:6]}")
    assert (snap / "app.py").read_text() == APP

    stranger = HfApi(endpoint=hub.endpoint, token=hub.create_user(_name("other")))
    with pytest.raises(HfHubHTTPError) as err:
        stranger.add_space_secret(repo, "X", "y")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError):
        stranger.get_space_secrets(repo)


def test_failing_restart_hook_reports_runtime_error_without_secrets(api, hub):
    repo = api.create_repo(_name("broken"), repo_type="space", space_sdk="gradio",
                           space_secrets=[{"key": "TOKEN", "value": "hf_abcdefghijklmnopqrstuvwxyz"}]).repo_id

    def on_restart(repo_id, snapshot_dir, variables, secrets):
        raise RuntimeError(f"could not start with {secrets['TOKEN']}")

    hub.on_space_restart = on_restart
    try:
        api.upload_file(path_or_fileobj=APP.encode(), path_in_repo="app.py", repo_id=repo, repo_type="space")
        runtime = api.wait_for_space(repo, timeout=10, poll_interval=0.05)
    finally:
        hub.on_space_restart = None
    assert runtime.stage == "RUNTIME_ERROR"
    assert "could not start" in runtime.raw["errorMessage"] and "hf_abc" not in runtime.raw["errorMessage"]


def test_validate_yaml_agent_harnesses_and_invalid_card(api, hub):
    def post(path, payload):
        conn = http.client.HTTPConnection("127.0.0.1", hub.port)
        conn.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    assert post("/api/validate-yaml", json.dumps({"content": "---\nlicense: mit\n---\n", "repoType": "model"})) == \
        (200, {"errors": [], "warnings": []})
    status, body = post("/api/validate-yaml", json.dumps({"content": "---\nlicense: [mit\n---\n"}))
    assert status == 400 and body["errors"][0]["message"]
    status, body = post("/api/validate-yaml", "not json")
    assert status == 400 and body["errors"]  # still JSON
    conn = http.client.HTTPConnection("127.0.0.1", hub.port)
    conn.request("GET", "/api/agent-harnesses")
    assert json.loads(conn.getresponse().read()) == {"standardEnvVars": [], "harnesses": {}}

    repo = api.create_repo(_name("card")).repo_id
    with pytest.raises(ValueError):
        api.upload_file(path_or_fileobj=b"---\nlicense: [mit\n---\n# x\n", path_in_repo="README.md", repo_id=repo)
    assert api.list_repo_files(repo) == [".gitattributes"]
