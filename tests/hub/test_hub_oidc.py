"""Trusted Publishers: the local Hub's OIDC token exchange (hub/oauth.py) and publishing with it, driven by the
real `huggingface_hub` client (its own `_oidc` exchange code) against the session's local Hub.

The test issuer signs HS256 ID tokens with a key given to the Hub (`hub.oauth.key`, set per test); the claims are
GitHub's (`repository`, `job_workflow_ref`, `environment`)."""
from __future__ import annotations

import json
import time
import uuid

import pytest
from huggingface_hub import HfApi, get_session
from huggingface_hub._oidc import exchange_oidc_token
from huggingface_hub.errors import HfHubHTTPError

from hubforge.errors import StageError
from hubforge.hub.oauth import GITHUB_ISSUER, mint_id_token
from hubforge.recipe import resolve
from hubforge.rundir import RunDir
from hubforge.stages import publish

pytestmark = pytest.mark.hub

KEY = b"test-issuer-key-0123456789abcdef"
GH_REPO = "octo/hubforge-recipes"
PUBLISHER = {"repository": GH_REPO, "workflow": "train-and-publish.yml", "environment": "train"}


def claims(hub, **over) -> dict:
    base = {"iss": GITHUB_ISSUER, "aud": hub.endpoint, "exp": int(time.time()) + 300, "iat": int(time.time()),
            "repository": GH_REPO, "environment": "train", "ref": "refs/heads/main",
            "job_workflow_ref": f"{GH_REPO}/.github/workflows/train-and-publish.yml@refs/heads/main"}
    return {**base, **over}


@pytest.fixture
def issuer(hub, monkeypatch):
    monkeypatch.setattr(hub.oauth, "key", KEY)
    return lambda **over: mint_id_token(KEY, claims(hub, **over))


def set_publishers(hub, token: str, repo_id: str, publishers, kind: str = "models"):
    return get_session().put(f"{hub.endpoint}/api/{kind}/{repo_id}/settings", json={"trustedPublishers": publishers},
                             headers={"Authorization": f"Bearer {token}"})


def new_repo(api, prefix: str, publishers=(PUBLISHER,), **kw) -> str:
    repo = api.create_repo(f"{prefix}-{uuid.uuid4().hex[:8]}", **kw).repo_id
    if publishers:
        assert set_publishers(api._hub, api.token, repo, list(publishers),
                              "spaces" if kw.get("repo_type") == "space" else "models").status_code == 200
    return repo


@pytest.fixture
def hapi(api, hub):
    api._hub = hub  # new_repo needs the endpoint
    return api


# ---------------------------------------------------------------- the exchange
def test_an_exchanged_token_writes_its_one_repo_and_nothing_else(hub, hapi, issuer):
    mine, other = new_repo(hapi, "tp-mine"), new_repo(hapi, "tp-other")
    answer = exchange_oidc_token(subject_token=issuer(), resource=mine, endpoint=hub.endpoint)
    assert answer["token_type"] == "bearer" and 0 < answer["expires_in"] <= 3600
    scoped = HfApi(endpoint=hub.endpoint, token=answer["access_token"])
    scoped.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id=mine)
    scoped.create_repo(mine, exist_ok=True)  # the publish stage's ensure_repo: a 409 the client accepts
    scoped.create_tag(mine, tag="v1")
    who = scoped.whoami()["auth"]["accessToken"]
    assert who["role"] == "fineGrained" and who["fineGrained"]["scoped"][0]["entity"]["name"] == mine
    for attempt in (lambda: scoped.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=other),
                    lambda: scoped.create_repo(f"tp-new-{uuid.uuid4().hex[:8]}"),
                    lambda: scoped.delete_tag(other, tag="nope")):
        with pytest.raises(HfHubHTTPError) as err:
            attempt()
        assert err.value.response.status_code == 403 and f"scoped to the model repo {mine} only" in str(err.value)
    # a publisher cannot widen its own access
    assert set_publishers(hub, answer["access_token"], other, [PUBLISHER]).status_code == 403
    assert hapi.list_repo_files(other) == [".gitattributes"]


def test_the_space_and_dataset_prefixes_scope_to_that_repo_type(hub, hapi, issuer):
    space = new_repo(hapi, "tp-space", repo_type="space", space_sdk="gradio")
    token = exchange_oidc_token(subject_token=issuer(), resource=f"spaces/{space}", endpoint=hub.endpoint)["access_token"]
    scoped = HfApi(endpoint=hub.endpoint, token=token)
    scoped.upload_file(path_or_fileobj=b"x", path_in_repo="app.py", repo_id=space, repo_type="space")
    with pytest.raises(HfHubHTTPError):  # the model repo of the same name is another repo
        scoped.create_repo(space, exist_ok=True)


@pytest.mark.parametrize("why,over,fragment", [
    ("expired", {"exp": int(time.time()) - 10}, "expired"),
    ("another audience", {"aud": "https://huggingface.co"}, "audience"),
    ("another issuer", {"iss": "https://evil.example"}, "issuer"),
    ("another workflow", {"job_workflow_ref": f"{GH_REPO}/.github/workflows/ci.yml@refs/heads/main"}, "no Trusted Publisher"),
    ("another environment", {"environment": "pr"}, "no Trusted Publisher"),
    ("another repository", {"repository": "mallory/fork"}, "no Trusted Publisher"),
])
def test_a_bad_id_token_is_invalid_grant(hub, hapi, issuer, why, over, fragment):
    repo = new_repo(hapi, "tp-bad")
    with pytest.raises(HfHubHTTPError) as err:
        exchange_oidc_token(subject_token=issuer(**over), resource=repo, endpoint=hub.endpoint)
    assert err.value.response.status_code == 400, why
    assert "invalid_grant" in str(err.value) and fragment in str(err.value), str(err.value)


def test_forged_unsigned_and_unknown_repo_tokens_are_refused(hub, hapi, issuer):
    repo = new_repo(hapi, "tp-forged")
    good = issuer()
    head, body, _ = good.split(".")
    forged = mint_id_token(b"not-the-key", claims(hub))
    unsigned = mint_id_token(KEY, claims(hub)).replace(head, "eyJhbGciOiJub25lIn0", 1)  # {"alg":"none"}
    for token, resource, fragment in ((forged, repo, "signature"), (unsigned, repo, "HS256"),
                                      (f"{head}.{body}", repo, "not a JWT"),
                                      (good, "hubforge/never-created", "no Trusted Publisher"),
                                      (good, new_repo(hapi, "tp-none", publishers=()), "no Trusted Publisher")):
        with pytest.raises(HfHubHTTPError) as err:
            exchange_oidc_token(subject_token=token, resource=resource, endpoint=hub.endpoint)
        assert err.value.response.status_code == 400 and fragment in str(err.value), str(err.value)
        assert good not in str(err.value)


def test_no_issuer_key_refuses_every_exchange_and_settings_are_checked(hub, hapi, token):
    repo = new_repo(hapi, "tp-nokey")
    with pytest.raises(HfHubHTTPError) as err:
        exchange_oidc_token(subject_token=mint_id_token(KEY, claims(hub)), resource=repo, endpoint=hub.endpoint)
    assert "invalid_grant" in str(err.value) and "HUBFORGE_HUB_OIDC_KEY" in str(err.value)
    for bad in ({"repository": GH_REPO}, [{"repository": "no-slash", "workflow": "a.yml"}], [{"x": 1}]):
        reply = set_publishers(hub, token, repo, bad)
        assert reply.status_code == 400 and "trustedPublishers" in reply.json()["error"]


# ---------------------------------------------------------------- publishing with it
def fake_run(tmp_path, hub_ns: str):
    """A run directory whose stages are recorded done (small stand-in files: publishing does not load them)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, '
                                                  '{"role": "assistant", "content": "b"}]}\n')
    uid = uuid.uuid4().hex[:6]
    recipe = resolve({"name": f"tp-{uid}", "base": {"model": "./base"}, "method": {"name": "lora"},
                      "data": {"files": ["data/chat.jsonl"], "format": "messages"},
                      "card": {"languages": ["fa"], "description": "oidc test"}, "space": {"enabled": False},
                      "publish": {"namespace": hub_ns, "adapter_repo": f"tp-{uid}-lora", "merged_repo": f"tp-{uid}",
                                  "gguf_repo": f"tp-{uid}-GGUF"}}, root=tmp_path, source="<test>")
    rd = RunDir.open(tmp_path / "runs" / "run-1")
    files = {"train": {"adapter/adapter_model.safetensors": b"a" * 64, "adapter/adapter_config.json": b"{}"},
             "merge": {"model/model.safetensors": b"m" * 64, "model/config.json": b"{}"},
             "gguf": {f"{recipe.name}-F16.gguf": b"GGUF" * 16}}
    for stage, content in files.items():
        for rel, data in content.items():
            (rd.stage_dir(stage) / rel).parent.mkdir(parents=True, exist_ok=True)
            (rd.stage_dir(stage) / rel).write_bytes(data)
    gguf = [{"file": f"gguf/{recipe.name}-F16.gguf", "type": "F16"}]
    (rd.stage_dir("gguf") / "quality.json").write_text(json.dumps({"files": gguf}))
    results = {"train": {"adapter_dir": "train/adapter"}, "merge": {"model_dir": "merge/model", "gated": False},
               "gguf": {"files": gguf, "quality": "gguf/quality.json", "tokenizer_probe": {"ok": True}}}
    for stage, result in results.items():
        rd.mark(stage, status="done", result=result, outputs=rd.describe_outputs(stage))
    for kind in ("adapter", "merged", "gguf"):
        (rd.stage_dir("card") / kind).mkdir(parents=True, exist_ok=True)
        (rd.stage_dir("card") / kind / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# {kind}\n")
    rd.mark("card", status="done", result={"cards": {k: f"card/{k}/README.md" for k in ("adapter", "merged", "gguf")},
                                           "validated": True}, outputs=rd.describe_outputs("card"))
    return recipe, rd


def test_first_publish_falls_back_to_hf_token_then_each_repo_publishes_with_its_own_oidc_token(
        hub, hapi, token, issuer, tmp_path, monkeypatch, capsys):
    recipe, rd = fake_run(tmp_path, "hubforge")
    id_token = issuer()
    monkeypatch.setenv("HF_OIDC_ID_TOKEN", id_token)
    monkeypatch.setenv("HF_TOKEN", token)
    first = publish.run(recipe, rd)  # the repos do not exist: no publisher can be configured yet
    assert {k: r["credential"] for k, r in first["repos"].items()} == dict.fromkeys(("adapter", "merged", "gguf"), "token")
    assert capsys.readouterr().out.count("credential: HF_TOKEN") == 3
    for r in first["repos"].values():
        assert set_publishers(hub, token, r["repo_id"], [PUBLISHER]).status_code == 200

    monkeypatch.delenv("HF_TOKEN")  # from now on no stored token at all
    (rd.stage_dir("card") / "gguf" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# gguf v2\n")
    rd.mark("card", status="done", result=rd.result("card"), outputs=rd.describe_outputs("card"))
    second = publish.run(recipe, rd)
    assert {k: r["credential"] for k, r in second["repos"].items()} == dict.fromkeys(("adapter", "merged", "gguf"), "oidc")
    assert second["repos"]["gguf"]["uploaded"] and not second["repos"]["adapter"]["uploaded"]
    out = capsys.readouterr().out
    assert out.count("credential: Trusted Publisher (OIDC") == 3 and id_token not in out
    assert id_token not in json.dumps(second) and "hf_oidc_" not in json.dumps(second) + out
    assert hapi.list_repo_refs(recipe.publish.gguf_repo).tags[0].name == publish.tag_name(recipe)


def test_oidc_refused_for_an_existing_repo_is_a_clear_error_never_a_silent_fallback(
        hub, hapi, token, issuer, tmp_path, monkeypatch):
    recipe, rd = fake_run(tmp_path, "hubforge")
    for repo in (recipe.publish.adapter_repo, recipe.publish.merged_repo, recipe.publish.gguf_repo):
        hapi.create_repo(repo)
        set_publishers(hub, token, repo, [PUBLISHER])
    expired = issuer(exp=int(time.time()) - 5)
    monkeypatch.setenv("HF_OIDC_ID_TOKEN", expired)
    monkeypatch.setenv("HF_TOKEN", token)  # present, and still not used for a repo whose exchange was refused
    with pytest.raises(StageError) as err:
        publish.run(recipe, rd)
    msg = str(err.value)
    assert "invalid_grant" in msg and "expired" in msg and recipe.publish.adapter_repo in msg
    assert "Trusted Publishers" in msg and expired not in msg and token not in msg
    assert hapi.list_repo_files(recipe.publish.adapter_repo) == [".gitattributes"]


def test_a_first_publish_under_oidc_without_hf_token_says_what_is_missing(hub, hapi, issuer, tmp_path, monkeypatch):
    recipe, rd = fake_run(tmp_path, "hubforge")
    monkeypatch.setenv("HF_OIDC_ID_TOKEN", issuer())
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(StageError, match="does not exist yet.*first publish needs HF_TOKEN"):
        publish.run(recipe, rd)
    assert not hapi.repo_exists(recipe.publish.adapter_repo)


def test_the_space_stage_credential_is_a_token_of_the_space_alone(hub, hapi, token, issuer, monkeypatch):
    from hubforge import hubclient

    space = new_repo(hapi, "tp-demo", repo_type="space", space_sdk="gradio")
    monkeypatch.setenv("HF_OIDC_ID_TOKEN", issuer())
    monkeypatch.delenv("HF_TOKEN", raising=False)
    scoped, how = hubclient.credential(space, "space", stage="space")
    assert how == "oidc"
    api = hubclient.api(scoped)
    api.add_space_variable(space, "HUBFORGE_MODEL", "hubforge/x")  # what space.deploy does with it
    api.restart_space(space)
    assert api.get_space_variables(space)["HUBFORGE_MODEL"].value == "hubforge/x"
    with pytest.raises(HfHubHTTPError):
        api.create_repo(space, exist_ok=True)  # the model repo of that name: not this token's


def test_in_a_github_job_the_id_token_is_minted_from_the_runtime_and_only_with_the_switch(hub, hapi, issuer, monkeypatch):
    """A stand-in for GitHub's ID-token service (ACTIONS_ID_TOKEN_REQUEST_URL/TOKEN, as `id-token: write` sets them):
    the client asks it for a token with the Hub's URL as audience, then exchanges it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlparse

    from hubforge import hubclient

    asked = []

    class GitHub(BaseHTTPRequestHandler):
        def do_GET(self):
            audience = parse_qs(urlparse(self.path).query)["audience"][0]
            asked.append((audience, self.headers["Authorization"]))
            body = json.dumps({"value": mint_id_token(KEY, claims(hub, aud=audience))}).encode()
            self.send_response(200 if self.headers["Authorization"] == "Bearer runtime-token" else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), GitHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        repo = new_repo(hapi, "tp-gh")
        monkeypatch.delenv("HF_OIDC_ID_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN", hapi.token)
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"http://127.0.0.1:{server.server_address[1]}/token?api-version=2.0")
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "runtime-token")
        monkeypatch.delenv("HUBFORGE_OIDC", raising=False)
        assert hubclient.credential(repo) == (hapi.token, "token") and not asked  # the permission alone: no OIDC
        monkeypatch.setenv("HUBFORGE_OIDC", "1")
        scoped, how = hubclient.credential(repo)
        assert how == "oidc" and scoped != hapi.token and asked == [(hub.endpoint, "Bearer runtime-token")]
        HfApi(endpoint=hub.endpoint, token=scoped).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    finally:
        server.shutdown()
        server.server_close()


def test_hf_oidc_resource_set_for_the_whole_process_is_refused_with_what_to_do(monkeypatch):
    from hubforge import hubclient

    monkeypatch.setenv("HF_OIDC_RESOURCE", "hubforge/one-repo")
    with pytest.raises(StageError, match="HF_OIDC_RESOURCE is set.*unset it"):
        hubclient.credential("hubforge/another")
