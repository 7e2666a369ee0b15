"""Deleted repos take their presigned URLs and blobs with them; garbage collection never touches a live blob,
not even one a commit in flight has just stored."""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from hubforge.hub import serve

pytestmark = pytest.mark.hub
LFS = 11 * 2**20  # over the LFS threshold


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _get(url: str) -> tuple[int, bytes]:
    host, _, path = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(*host.split(":"), timeout=30)
    conn.request("GET", "/" + path)
    r = conn.getresponse()
    return r.status, r.read()


def _cdn_location(hub, token: str, repo: str, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
    conn.request("HEAD", f"/{repo}/resolve/main/{path}", headers={"Authorization": f"Bearer {token}"})
    r = conn.getresponse()
    r.read()
    assert r.status == 302
    return r.getheader("Location")


def test_deleted_repo_urls_die_and_only_unreferenced_blobs_are_collected(tmp_path, cache_dir):
    hub = serve(tmp_path / "d")
    try:
        token = hub.token_path.read_text().strip()
        api = HfApi(endpoint=hub.endpoint, token=token)
        blobs = hub.storage.blobs
        kept, doomed = api.create_repo("kept").repo_id, api.create_repo("doomed").repo_id
        shared, kept_big, doomed_big = os.urandom(LFS), os.urandom(LFS), os.urandom(LFS)
        for repo, big in ((kept, kept_big), (doomed, doomed_big)):
            api.upload_file(path_or_fileobj=shared, path_in_repo="shared.bin", repo_id=repo)
            api.upload_file(path_or_fileobj=big, path_in_repo="own.bin", repo_id=repo)
            api.upload_file(path_or_fileobj=f"text of {repo}".encode(), path_in_repo="a.txt", repo_id=repo)
        sha = {name: hashlib.sha256(data).hexdigest() for name, data in
               (("shared", shared), ("kept", kept_big), ("doomed", doomed_big),
                ("doomed_text", f"text of {doomed}".encode()))}
        url = _cdn_location(hub, token, doomed, "own.bin")
        assert _get(url) == (200, doomed_big)

        # A refused commit (stale parent) stored its inline file before it was refused.
        stale = api.list_repo_commits(kept)[1].commit_id
        refused = os.urandom(1000)
        with pytest.raises(HfHubHTTPError):
            api.create_commit(kept, [CommitOperationAdd("late.bin.txt", base64.b64encode(refused))],
                              commit_message="late", parent_commit=stale)
        refused_sha = hashlib.sha256(base64.b64encode(refused)).hexdigest()
        assert blobs.size(refused_sha) is not None

        api.delete_repo(doomed)
        assert _get(url)[0] in (403, 404)  # the URL issued before the delete no longer serves the bytes
        assert blobs.size(sha["doomed"]) is None and blobs.size(sha["doomed_text"]) is None
        assert blobs.size(refused_sha) is None
        assert blobs.size(sha["shared"]) == LFS and blobs.size(sha["kept"]) == LFS  # still referenced by `kept`

        api.create_repo("doomed")  # a new repo of the same name does not revive old URLs
        api.upload_file(path_or_fileobj=doomed_big, path_in_repo="own.bin", repo_id=doomed)
        assert _get(url)[0] in (403, 404)
        assert _get(_cdn_location(hub, token, doomed, "own.bin")) == (200, doomed_big)

        for name, data in (("shared.bin", shared), ("own.bin", kept_big), ("a.txt", f"text of {kept}".encode())):
            got = hf_hub_download(kept, name, endpoint=hub.endpoint, token=token, cache_dir=cache_dir)
            assert Path(got).read_bytes() == data
        first = api.list_repo_commits(kept)[-1].commit_id  # history stays downloadable, not only the head
        assert hf_hub_download(kept, ".gitattributes", revision=first, endpoint=hub.endpoint, token=token,
                               cache_dir=cache_dir)
    finally:
        hub.stop()

    orphan = hub.storage.blobs.path("ab" * 32)  # e.g. left by a crash between storing a blob and committing
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    again = serve(tmp_path / "d")  # collection on start
    try:
        assert not orphan.exists() and again.storage.blobs.size(sha["kept"]) == LFS
    finally:
        again.stop()


def test_a_commit_in_flight_keeps_its_blobs_through_a_collection(api, hub, token, cache_dir):
    """The commit's first file is stored, then a collection runs, then the commit finishes: nothing is lost."""
    repo = api.create_repo(_name("inflight")).repo_id
    content = os.urandom(4096)
    header = json.dumps({"key": "header", "value": {"summary": "racing a collection"}}).encode() + b"\n"
    line = json.dumps({"key": "file", "value": {"path": "racer.bin.txt", "content": base64.b64encode(content).decode(),
                                                "encoding": "utf-8"}}).encode() + b"\n"
    tail = json.dumps({"key": "file", "value": {"path": "second.txt", "content": "QUFB" * 50_000}}).encode()
    body = header + line + tail
    stored = hashlib.sha256(base64.b64encode(content)).hexdigest()
    first = len(header + line) + 100_000  # the server reads 64 KiB pieces: send past the piece that ends `line`
    with socket.create_connection(("127.0.0.1", hub.port), timeout=30) as s:
        s.sendall(f"POST /api/models/{repo}/commit/main HTTP/1.1\r\nHost: 127.0.0.1:{hub.port}\r\n"
                  f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:first])
        deadline = time.time() + 10
        while hub.storage.blobs.size(stored) is None and time.time() < deadline:
            time.sleep(0.01)
        assert hub.storage.blobs.size(stored) is not None  # stored, referenced by no commit yet
        hub.storage.collect_garbage()
        assert hub.storage.blobs.size(stored) is not None  # pinned by the commit in flight
        s.sendall(body[first:])
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    got = hf_hub_download(repo, "racer.bin.txt", endpoint=hub.endpoint, token=token, cache_dir=cache_dir)
    assert Path(got).read_bytes() == base64.b64encode(content)


def test_commits_racing_repeated_collections_all_stay_downloadable(api, hub, token, tmp_path):
    repo = api.create_repo(_name("gcrace")).repo_id
    stop, errors, collections = threading.Event(), [], [0]

    def collect():
        while not stop.is_set():
            hub.storage.collect_garbage()
            collections[0] += 1

    def commit(tag):
        try:
            for i in range(6):
                api.upload_file(path_or_fileobj=os.urandom(2048), path_in_repo=f"{tag}/{i}.dat.txt", repo_id=repo)
        except Exception as exc:  # surfaced below
            errors.append(exc)
    collector = threading.Thread(target=collect)
    committers = [threading.Thread(target=commit, args=(t,)) for t in "ab"]
    collector.start()
    [t.start() for t in committers]
    [t.join() for t in committers]
    stop.set()
    collector.join()
    assert not errors and collections[0] > 1
    for commit_info in api.list_repo_commits(repo):  # every file of every commit is still there
        record = hub.storage.commit_record("model", repo, commit_info.commit_id)
        missing = [p for p, e in record["tree"].items() if hub.storage.blobs.size(e["sha256"]) != e["size"]]
        assert not missing, (commit_info.commit_id, missing)
    assert len(api.list_repo_files(repo)) == 13


def test_an_upload_for_a_refused_commit_is_collected_after_the_grace_period(tmp_path):
    from hubforge.hub import storage

    hub = serve(tmp_path / "d")
    try:
        api = HfApi(endpoint=hub.endpoint, token=hub.token_path.read_text().strip())
        repo = api.create_repo(_name("refused")).repo_id
        kept, orphan = os.urandom(LFS), os.urandom(LFS)
        api.upload_file(path_or_fileobj=kept, path_in_repo="kept.bin", repo_id=repo)
        with pytest.raises(HfHubHTTPError) as refused:  # the LFS object is uploaded, then the commit is refused
            api.create_commit(repo, operations=[CommitOperationAdd("orphan.bin", orphan)], commit_message="stale",
                              parent_commit="0" * 40)
        assert refused.value.response.status_code in (409, 412)
        sha = {name: hashlib.sha256(data).hexdigest() for name, data in (("kept", kept), ("orphan", orphan))}
        markers = hub.storage.repo_dir("model", repo) / "lfs"
        assert hub.storage.blobs.size(sha["orphan"]) == LFS and (markers / sha["orphan"]).exists()

        hub.storage.collect_garbage()  # within the grace period: a commit may still come for it
        assert hub.storage.blobs.size(sha["orphan"]) == LFS
        old = time.time() - storage.LFS_UPLOAD_GRACE_S - 60
        for marker in markers.iterdir():
            os.utime(marker, (old, old))
        assert hub.storage.collect_garbage() == 1
        assert hub.storage.blobs.size(sha["orphan"]) is None and not (markers / sha["orphan"]).exists()
        assert hub.storage.blobs.size(sha["kept"]) == LFS  # committed: an old marker does not matter
        assert hf_hub_download(repo, "kept.bin", endpoint=hub.endpoint, cache_dir=tmp_path / "c") and True
    finally:
        hub.stop()
