"""Access control, durability, concurrency and hostile input for the local Hub, with the real client and raw sockets."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from hubnet import raw_request as _raw  # tests/fixtures

from hubforge.hub import Limits, serve

pytestmark = pytest.mark.hub


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_private_repo_is_invisible_without_the_right_token(api, hub, cache_dir):
    repo = api.create_repo(_name("secret"), private=True).repo_id
    api.upload_file(path_or_fileobj=b"classified", path_in_repo="x.txt", repo_id=repo)
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    stranger = HfApi(endpoint=hub.endpoint, token=hub.create_user(_name("stranger")))
    assert api.model_info(repo).private is True
    assert not anonymous.repo_exists(repo) and not stranger.repo_exists(repo)
    with pytest.raises(RepositoryNotFoundError):
        stranger.model_info(repo)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo, "x.txt", endpoint=hub.endpoint, token=False, cache_dir=cache_dir)
    assert repo not in [m.id for m in anonymous.list_models(author=repo.split("/")[0])]

    org = _name("org")
    member = HfApi(endpoint=hub.endpoint, token=hub.create_user(_name("member"), orgs=[org]))
    org_repo = member.create_repo(f"{org}/shared", private=True).repo_id
    colleague = HfApi(endpoint=hub.endpoint, token=hub.create_user(_name("colleague"), scope="read", orgs=[org]))
    assert colleague.repo_exists(org_repo) and not api.repo_exists(org_repo)


def test_read_scope_cannot_write_and_wrong_token_is_rejected(api, hub):
    org = _name("team")
    writer = HfApi(endpoint=hub.endpoint, token=hub.create_user(_name("writer"), orgs=[org]))
    repo = writer.create_repo(f"{org}/model", private=True).repo_id
    reader = HfApi(endpoint=hub.endpoint, token=hub.create_user(_name("reader"), scope="read", orgs=[org]))
    assert reader.model_info(repo).private
    with pytest.raises(HfHubHTTPError) as err:
        reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        reader.create_repo(f"{org}/other")
    assert err.value.response.status_code == 403

    wrong = HfApi(endpoint=hub.endpoint, token="hf_" + "x" * 34)
    for call in (wrong.whoami, lambda: wrong.model_info(repo)):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code == 401
        assert "hf_xxxx" not in str(err.value)


def test_restart_keeps_repos_files_refs_and_tokens(tmp_path, cache_dir):
    data = tmp_path / "data"
    first = serve(data)
    port, token = first.port, first.token_path.read_text()
    api = HfApi(endpoint=first.endpoint, token=token)
    repo = api.create_repo("persist", private=True).repo_id
    api.upload_file(path_or_fileobj=os.urandom(11 * 2**20), path_in_repo="w.bin", repo_id=repo)
    api.create_tag(repo, tag="v1")
    api.create_branch(repo, branch="exp")
    reader = first.create_user("reader", scope="read")
    before = (api.model_info(repo).sha, api.list_repo_refs(repo))
    with pytest.raises(RuntimeError):  # one server per data dir
        serve(data)
    first.stop()

    second = serve(data, port=port)
    try:
        assert second.token_path.read_text() == token
        assert (data / "token").stat().st_mode & 0o777 == 0o600 and (data / "users.json").stat().st_mode & 0o077 == 0
        assert token not in (data / "users.json").read_text()  # only token hashes are stored
        assert (api.model_info(repo).sha, api.list_repo_refs(repo)) == before
        assert api.model_info(repo).private
        path = hf_hub_download(repo, "w.bin", revision="v1", endpoint=second.endpoint, token=token,
                               cache_dir=cache_dir)
        assert Path(path).stat().st_size == 11 * 2**20
        assert HfApi(endpoint=second.endpoint, token=reader).whoami()["name"] == "reader"
    finally:
        second.stop()


def test_concurrent_commits_all_land_and_stale_parent_is_refused(api, hub):
    repo = api.create_repo(_name("race")).repo_id
    errors = []

    def worker(tag):
        try:
            for i in range(4):
                api.upload_file(path_or_fileobj=f"{tag}{i}".encode(), path_in_repo=f"{tag}/{i}.txt", repo_id=repo)
        except Exception as exc:  # surfaced below with the thread's name
            errors.append((tag, exc))
    threads = [threading.Thread(target=worker, args=(t,)) for t in ("a", "b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert sorted(api.list_repo_files(repo)) == sorted([".gitattributes"] + [f"{t}/{i}.txt" for t in "ab"
                                                                              for i in range(4)])
    assert len(api.list_repo_commits(repo)) == 9  # 8 commits on top of the initial one: none lost

    stale = api.list_repo_commits(repo)[1].commit_id
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(repo, [CommitOperationAdd("late.txt", b"late")], commit_message="late",
                          parent_commit=stale)
    assert err.value.response.status_code == 412
    assert "late.txt" not in api.list_repo_files(repo)


def test_interrupted_lfs_upload_leaves_nothing_visible(api, hub):
    repo = api.create_repo(_name("cut")).repo_id
    payload = os.urandom(3 * 2**20)
    oid = hashlib.sha256(payload).hexdigest()
    auth = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/vnd.git-lfs+json"}
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(payload)}]}
    status, _, body = _raw(hub.port, "POST", f"/{repo}.git/info/lfs/objects/batch", json.dumps(batch).encode(), auth)
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    path = href.split(str(hub.port), 1)[1]

    with socket.create_connection(("127.0.0.1", hub.port)) as s:  # half the body, then hang up
        s.sendall(f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{hub.port}\r\nContent-Length: {len(payload)}\r\n\r\n"
                  .encode() + payload[: len(payload) // 2])
    status, _, _ = _raw(hub.port, "GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {api.token}"})
    assert status == 200  # the server still answers
    assert hub.storage.blobs.size(oid) is None
    line = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(payload)}}
    ndjson = "\n".join(json.dumps(x) for x in [{"key": "header", "value": {"summary": "x"}}, line]).encode()
    status, _, _ = _raw(hub.port, "POST", f"/api/models/{repo}/commit/main", ndjson,
                        {"Authorization": f"Bearer {api.token}", "Content-Type": "application/x-ndjson"})
    assert status == 400  # a commit cannot reference the missing object
    assert api.list_repo_files(repo) == [".gitattributes"]
    for _ in range(50):  # the upload thread notices the hang-up and removes its temp file
        if not list(hub.storage.blobs.tmp.glob("upload-*")):
            break
        threading.Event().wait(0.05)
    assert not list(hub.storage.blobs.tmp.glob("upload-*"))


def test_malformed_and_oversized_requests_get_4xx(tmp_path, api, hub):
    auth = {"Authorization": f"Bearer {api.token}"}
    assert _raw(hub.port, "POST", "/api/repos/create", b"{not json", auth)[0] == 400
    assert _raw(hub.port, "POST", "/api/repos/create", b"[1, 2]", auth)[0] == 400
    assert _raw(hub.port, "POST", "/api/repos/create", json.dumps({"name": "../evil"}).encode(), auth)[0] == 400
    status, headers, body = _raw(hub.port, "GET", "/api/nothing-here")
    assert status == 404 and json.loads(body)["error"]
    repo = api.create_repo(_name("bad")).repo_id
    bad_line = (b'{"key": "header", "value": {"summary": "x"}}\n'
                b'{"key": "file", "value": {"path": "../x", "content": ""}}')
    assert _raw(hub.port, "POST", f"/api/models/{repo}/commit/main", bad_line, auth)[0] == 400
    assert _raw(hub.port, "POST", f"/api/models/{repo}/commit/main", b"\x00\xff garbage", auth)[0] == 400
    status, headers, _ = _raw(hub.port, "GET", f"/api/models/{repo}/revision/nope")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    for raw in (b"\x16\x03\x01 garbage HTTP/x\r\n\r\n", b"GET /api/whoami-v2 HTTP/1.1\r\nContent-Length: -5\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", hub.port)) as s:  # not HTTP / a nonsense length
            s.sendall(raw)
            assert s.recv(100).startswith(b"HTTP/1.1 400")

    small = serve(tmp_path / "small", limits=Limits(max_file_bytes=2**20, max_json_bytes=1024))
    try:
        tok = {"Authorization": f"Bearer {small.token_path.read_text()}"}
        assert _raw(small.port, "POST", "/api/repos/create", b"{" + b" " * 4096 + b"}", tok)[0] == 413
        small_api = HfApi(endpoint=small.endpoint, token=small.token_path.read_text())
        r = small_api.create_repo("tiny").repo_id
        with pytest.raises(HfHubHTTPError) as err:
            small_api.upload_file(path_or_fileobj=os.urandom(2 * 2**20), path_in_repo="w.bin", repo_id=r)
        assert err.value.response.status_code == 413
        with socket.create_connection(("127.0.0.1", small.port)) as s:  # claims 50 GB: refused before reading
            s.sendall(f"POST /api/models/{r}/commit/main HTTP/1.1\r\nHost: x\r\nAuthorization: {tok['Authorization']}"
                      f"\r\nContent-Length: {50 * 10**9}\r\n\r\n".encode())
            assert s.recv(100).startswith(b"HTTP/1.1 413")
        assert _raw(small.port, "GET", "/api/whoami-v2", headers=tok)[0] == 200
    finally:
        small.stop()


def test_cli_serve_prints_endpoint_but_not_the_token_to_a_pipe(tmp_path):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "hubforge.hub", "--data-dir", str(tmp_path / "d"), "--port",
                             str(free)], stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # see test_hub_jobs._cli
    try:
        lines = [proc.stdout.readline() for _ in range(4)]
        assert f"HF_ENDPOINT=http://127.0.0.1:{free}\n" in lines
        token = (tmp_path / "d" / "token").read_text()
        assert _raw(free, "GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0 and token not in "".join(lines) + out
