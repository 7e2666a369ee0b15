"""Uploads, downloads, history and listings through the real `huggingface_hub` client against the local Hub."""
from __future__ import annotations

import http.client
import json
import os
import uuid
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import BadRequestError, EntryNotFoundError, RevisionNotFoundError

pytestmark = pytest.mark.hub

BIG = 10 * 2**20 + 12345  # just over the LFS threshold, not a multiple of the 1 MiB chunk


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _folder(root: Path, big: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- hubforge\nlibrary_name: peft\n---\n# Card\n")
    (root / "config.json").write_text(json.dumps({"hidden": 8}))
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("hello\n")
    (root / "model.safetensors").write_bytes(big)
    return root


def test_upload_download_round_trip_with_lfs(api, hub, tmp_path, cache_dir):
    repo = api.create_repo(_name("rt")).repo_id
    big = os.urandom(BIG)
    (tmp_path / "big.bin").write_bytes(big)
    before = hub.stats["lfs_bytes_received"]
    api.upload_file(path_or_fileobj=b"small text\n", path_in_repo="a.txt", repo_id=repo)
    api.upload_file(path_or_fileobj=tmp_path / "big.bin", path_in_repo="weights/big.bin", repo_id=repo)
    assert hub.stats["lfs_bytes_received"] - before == BIG  # went through batch + presigned PUT

    small = hf_hub_download(repo, "a.txt", endpoint=hub.endpoint, token=api.token, cache_dir=cache_dir)
    assert Path(small).read_bytes() == b"small text\n"
    got = hf_hub_download(repo, "weights/big.bin", endpoint=hub.endpoint, token=api.token, cache_dir=cache_dir)
    assert Path(got).read_bytes() == big

    entries = {e.path: e for e in api.list_repo_tree(repo, recursive=True)}
    assert entries["weights/big.bin"].lfs.size == BIG and entries["weights/big.bin"].size == BIG
    assert entries["a.txt"].lfs is None
    assert "weights" in entries  # directories are listed too
    info = api.model_info(repo, files_metadata=True)
    assert len(info.sha) == 40 and info.private is False
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "a.txt", "weights/big.bin"}
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.txt", endpoint=hub.endpoint, token=api.token, cache_dir=cache_dir)


def test_upload_folder_snapshot_and_model_card(api, hub, tmp_path, cache_dir):
    repo = api.create_repo(_name("folder")).repo_id
    src = _folder(tmp_path / "src", os.urandom(BIG))
    api.upload_folder(folder_path=src, repo_id=repo, commit_message="add model")
    snap = Path(snapshot_download(repo, endpoint=hub.endpoint, token=api.token, cache_dir=cache_dir))
    for rel in ("README.md", "config.json", "sub/notes.txt", "model.safetensors"):
        assert (snap / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "README.md", "config.json",
                                                 "model.safetensors", "sub/notes.txt"]
    card = ModelCard.load(repo, token=api.token)  # uses the import-time HF_ENDPOINT
    assert card.data.license == "apache-2.0" and card.data.tags == ["hubforge"]
    info = api.model_info(repo)
    assert info.card_data.library_name == "peft" and "license:apache-2.0" in info.tags
    assert api.list_repo_commits(repo)[0].title == "add model"


def test_branches_tags_and_downloads_by_revision(api, hub, cache_dir):
    repo = api.create_repo(_name("refs")).repo_id
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo).oid
    api.create_tag(repo, tag="v1.0", tag_message="first")
    api.create_branch(repo, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=repo, revision="dev")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo)

    def read(rev):
        return Path(hf_hub_download(repo, "f.txt", revision=rev, endpoint=hub.endpoint, token=api.token,
                                    cache_dir=cache_dir)).read_bytes()
    assert (read("main"), read("dev"), read("v1.0"), read(first)) == (b"v2", b"dev", b"v1", b"v1")

    refs = api.list_repo_refs(repo)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", first)]
    commits = api.list_repo_commits(repo)
    assert len(commits) == 3 and commits[-1].title == "initial commit" and commits[1].commit_id == first
    with pytest.raises(RevisionNotFoundError):
        read("no-such-branch")
    api.delete_tag(repo, tag="v1.0")
    api.delete_branch(repo, branch="dev")
    assert [b.name for b in api.list_repo_refs(repo).branches] == ["main"]


def test_range_requests_on_regular_and_lfs_files(api, hub):
    repo = api.create_repo(_name("range")).repo_id
    big = os.urandom(BIG)
    api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="digits.txt", repo_id=repo)
    api.upload_file(path_or_fileobj=big, path_in_repo="big.bin", repo_id=repo)
    conn = http.client.HTTPConnection("127.0.0.1", hub.port)
    conn.request("GET", f"/{repo}/resolve/main/digits.txt", headers={"Range": "bytes=2-5"})
    r = conn.getresponse()
    assert (r.status, r.read(), r.getheader("Content-Range")) == (206, b"2345", "bytes 2-5/10")
    conn.request("GET", f"/{repo}/resolve/main/big.bin", headers={"Range": "bytes=-100"})
    r = conn.getresponse()
    r.read()
    assert r.status == 302 and r.getheader("X-Linked-Size") == str(BIG)
    location = r.getheader("Location")
    assert location.startswith(f"http://localhost:{hub.port}/_cdn/")  # another origin, like the Hub's CDN
    cdn = http.client.HTTPConnection("localhost", hub.port)
    cdn.request("GET", location.split(str(hub.port), 1)[1], headers={"Range": "bytes=-100"})
    r = cdn.getresponse()
    assert (r.status, r.read(), r.getheader("Content-Range")) == (206, big[-100:], f"bytes {BIG - 100}-{BIG - 1}/{BIG}")
    conn.request("GET", f"/{repo}/resolve/main/digits.txt", headers={"Range": "bytes=50-"})
    r = conn.getresponse()
    r.read()
    assert r.status == 416


def test_unchanged_reupload_makes_no_commit_and_sends_no_bytes(api, hub, tmp_path):
    repo = api.create_repo(_name("noop")).repo_id
    src = _folder(tmp_path / "src", os.urandom(BIG))
    api.upload_folder(folder_path=src, repo_id=repo)
    sha = api.model_info(repo).sha
    before = hub.stats.snapshot()
    api.upload_folder(folder_path=src, repo_id=repo)
    after = hub.stats.snapshot()
    assert api.model_info(repo).sha == sha
    for key in ("lfs_bytes_received", "inline_bytes_received", "commits_created"):
        assert after.get(key, 0) == before.get(key, 0), key

    (src / "config.json").write_text(json.dumps({"hidden": 16}))
    api.upload_folder(folder_path=src, repo_id=repo)
    final = hub.stats.snapshot()
    assert api.model_info(repo).sha != sha
    assert final["inline_bytes_received"] - after["inline_bytes_received"] == len(json.dumps({"hidden": 16}))
    assert final["lfs_bytes_received"] == after["lfs_bytes_received"]


def test_delete_files_folders_paths_info_and_datasets(api, hub, cache_dir):
    repo = api.create_repo(_name("ds"), repo_type="dataset").repo_id
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id=repo, repo_type="dataset")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="data/extra/x.txt", repo_id=repo, repo_type="dataset")
    got = hf_hub_download(repo, "data/train.csv", repo_type="dataset", endpoint=hub.endpoint, token=api.token,
                          cache_dir=cache_dir)
    assert Path(got).read_bytes() == b"a,b\n1,2\n"
    top = [(e.path, type(e).__name__) for e in api.list_repo_tree(repo, repo_type="dataset", path_in_repo="data")]
    assert top == [("data/extra", "RepoFolder"), ("data/train.csv", "RepoFile")]
    infos = api.get_paths_info(repo, ["data/train.csv", "data", "nope"], repo_type="dataset")
    assert sorted(i.path for i in infos) == ["data", "data/train.csv"]
    with pytest.raises(BadRequestError):  # a path cannot be both a file and a folder
        api.upload_file(path_or_fileobj=b"x", path_in_repo="data", repo_id=repo, repo_type="dataset")
    api.delete_folder("data/extra", repo_id=repo, repo_type="dataset")
    api.delete_file("data/train.csv", repo_id=repo, repo_type="dataset")
    assert api.list_repo_files(repo, repo_type="dataset") == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("data/train.csv", repo_id=repo, repo_type="dataset")
    api.delete_repo(repo, repo_type="dataset")
    assert not api.repo_exists(repo, repo_type="dataset")
