"""The local Hub against hostile and careless clients, over real sockets: bounded bodies, typed JSON, card bombs,
start-up errors and a fuzzed commit endpoint.

Bounds (safety margins, not benchmarks): an anonymous client streaming 300 MB may grow the server's peak RSS
(VmHWM in /proc/<pid>/status of a separate server process) by at most 64 MB (a chunk size of -1 used to make
it read everything: +606 MB peak for 300 MB sent; now about 0); a README alias bomb (600 bytes) makes no listing
bigger than 64 KB or slower than 5 s; the fuzz (about 300 bodies) takes under 60 s.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from hubnet import free_port as _free_port, raw_request as _raw  # tests/fixtures

from hubforge.hub import serve

pytestmark = pytest.mark.hub
MB = 2**20


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _hub_process(data_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "hubforge.hub", "--data-dir", str(data_dir), "--port", str(port),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stream(port: int, head: bytes, block: bytes, total: int) -> tuple[bytes, int]:
    """Send `head`, then `block` repeatedly up to `total` bytes, reading the answer meanwhile: (answer, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    answer: list[bytes] = []

    def read():
        try:
            while data := sock.recv(65536):
                answer.append(data)
        except OSError:
            pass
    reader = threading.Thread(target=read)
    reader.start()
    sent = 0
    try:
        sock.sendall(head)
        while sent < total:
            sock.sendall(block)
            sent += len(block)
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the server hung up: that is the point
        pass
    reader.join(30)
    sock.close()
    return b"".join(answer), sent


def test_bodies_are_bounded_before_authentication(tmp_path):
    port = _free_port()
    proc = _hub_process(tmp_path / "data", port)
    try:
        assert proc.stdout.readline().startswith("Local Hub serving")
        token = (tmp_path / "data" / "token").read_text().strip()
        _raw(port, "GET", "/api/whoami-v2")  # warm up the request path before the baseline
        base = _proc_kb(proc.pid, "VmRSS")
        mb_zeros = b"0" * MB
        chunk = b"%x\r\n" % MB + mb_zeros + b"\r\n"
        chunked = "Transfer-Encoding: chunked\r\n\r\n"
        attacks = [  # (request head, what is streamed after it, expected status)
            (f"POST /api/repos/create HTTP/1.1\r\nHost: x\r\n{chunked}-1\r\n", mb_zeros, 400),  # was read(-1)
            (f"POST /api/models/hubforge/x/commit/main HTTP/1.1\r\nHost: x\r\n{chunked}-1\r\n", mb_zeros, 400),
            (f"POST /api/models/hubforge/x/commit/main HTTP/1.1\r\nHost: x\r\n{chunked}-10\r\n", mb_zeros, 400),
            (f"POST /api/models/hubforge/x/commit/main HTTP/1.1\r\nHost: x\r\n{chunked}0x10\r\n", mb_zeros, 400),
            (f"POST /api/repos/create HTTP/1.1\r\nHost: x\r\n{chunked}FFFFFFFFFFFFFFFF\r\n", mb_zeros, 413),
            (f"POST /api/repos/create HTTP/1.1\r\nHost: x\r\n{chunked}", chunk, 413),       # 300 MB, well framed
            (f"POST /api/models/hubforge/x/commit/main HTTP/1.1\r\nHost: x\r\n{chunked}", chunk, 401),
            (f"PUT /api/models/hubforge/x/settings HTTP/1.1\r\nHost: x\r\nContent-Length: {300 * MB}\r\n\r\n",
             mb_zeros, 413),
        ]
        for head, block, status in attacks:
            start = time.perf_counter()
            answer, sent = _stream(port, head.encode(), block, 300 * MB)
            assert answer.startswith(b"HTTP/1.1 %d" % status), (head, answer[:200])
            assert b"Connection: close" in answer and time.perf_counter() - start < 30
        growth_mb = (_proc_kb(proc.pid, "VmHWM") - base) / 1024
        assert growth_mb < 64, f"server peak RSS grew by {growth_mb:.0f} MB"
        status, _, body = _raw(port, "GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and json.loads(body)["name"] == "hubforge"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("body, message", [
    ({"name": "x", "type": ["model"]}, "`type` must be a string"),
    ({"name": ["x"]}, "`name` must be a string"),
    ({"name": "x", "private": "false"}, "`private` must be true or false"),
    ({"name": "x", "organization": {"a": 1}}, "`organization` must be a string"),
    ({"name": "x", "type": "space", "sdk": "gradio", "secrets": [{"key": "K", "value": 1}]}, "`value` must be"),
    ({"name": "x", "type": "weights"}, "`type` must be one of"),
    ({}, "`name` is required"),
])
def test_wrong_typed_json_fields_get_400_naming_the_field(hub, token, body, message):
    status, headers, data = _raw(hub.port, "POST", "/api/repos/create", json.dumps(body).encode(),
                                 {"Authorization": f"Bearer {token}"})
    assert status == 400 and message in json.loads(data)["error"] and message in headers["X-Error-Message"]


def test_deeply_nested_json_and_typed_fields_on_every_json_route(api, hub, token):
    repo = api.create_repo(_name("shape")).repo_id
    space = api.create_repo(_name("shape-space"), repo_type="space", space_sdk="gradio").repo_id
    auth = {"Authorization": f"Bearer {token}"}
    deep = b"[" * 100_000 + b"]" * 100_000
    routes = [("POST", "/api/repos/create"), ("DELETE", "/api/repos/delete"), ("PUT", f"/api/models/{repo}/settings"),
              ("POST", f"/api/models/{repo}/branch/b1"), ("POST", f"/api/models/{repo}/tag/main"),
              ("POST", f"/api/models/{repo}/preupload/main"), ("POST", f"/{repo}.git/info/lfs/objects/batch"),
              ("POST", f"/api/spaces/{space}/variables"), ("POST", f"/api/spaces/{space}/hardware"),
              ("POST", f"/api/models/{repo}/paths-info/main"), ("POST", "/api/validate-yaml")]
    for method, path in routes:
        for body in (deep, b'{"a": ' + deep + b"}"):
            status, _, data = _raw(hub.port, method, path, body, {**auth, "Content-Type": "application/json"})
            assert status == 400, (path, status, data[:200])
    wrong = [("PUT", f"/api/models/{repo}/settings", {"private": "false"}, "`private`"),
             ("PUT", f"/api/models/{repo}/settings", {"visibility": ["private"]}, "`visibility`"),
             ("POST", f"/api/models/{repo}/branch/b2", {"startingPoint": ["main"]}, "`startingPoint`"),
             ("POST", f"/api/models/{repo}/tag/main", {"tag": "v1", "message": {"m": 1}}, "`message`"),
             ("POST", f"/api/models/{repo}/preupload/main", {"files": {"path": "a"}}, "`files`"),
             ("POST", f"/api/spaces/{space}/variables", {"key": "K", "value": "v", "description": [1]},
              "`description`"),
             ("POST", f"/api/spaces/{space}/sleeptime", {"seconds": True}, "`seconds`"),
             ("POST", f"/api/models/{repo}/paths-info/main", {"paths": [["a"]]}, "`paths`"),
             ("DELETE", "/api/repos/delete", {"name": repo.split("/")[1], "type": ["model"]}, "`type`")]
    for method, path, body, name in wrong:
        status, _, data = _raw(hub.port, method, path, json.dumps(body).encode(),
                               {**auth, "Content-Type": "application/json"})
        assert status == 400 and name in json.loads(data)["error"], (path, status, data)
    info = api.model_info(repo)
    assert info.private is False and api.repo_exists(repo)  # neither made private nor deleted
    assert [b.name for b in api.list_repo_refs(repo).branches] == ["main"] and not api.list_repo_refs(repo).tags
    api.update_repo_settings(repo, private=True)  # the real client's shape still works
    assert api.model_info(repo).private is True


def _bomb_readme(levels: int = 9) -> bytes:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return ("---\nlicense: mit\n" + "\n".join(lines) + "\n---\n# bomb\n").encode()


def _commit(port: int, token: str, repo: str, files: dict[str, bytes], summary: str = "raw commit"):
    import base64
    lines = [{"key": "header", "value": {"summary": summary}}]
    lines += [{"key": "file", "value": {"path": p, "content": base64.b64encode(c).decode(), "encoding": "base64"}}
              for p, c in files.items()]
    body = "\n".join(json.dumps(x) for x in lines).encode()
    return _raw(port, "POST", f"/api/models/{repo}/commit/main", body,
                {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"})


def test_readme_alias_bomb_is_refused_at_commit_and_listings_stay_small(api, hub, token):
    bomb = _bomb_readme()
    assert len(bomb) < 700
    repo = api.create_repo(_name("bomb")).repo_id
    status, headers, data = _commit(hub.port, token, repo, {"README.md": bomb})
    assert status == 400 and "README.md" in headers["X-Error-Message"] and "alias" in json.loads(data)["error"]
    assert "front matter at line 6, column 14" in json.loads(data)["error"]  # README line of the alias past budget
    with pytest.raises(ValueError, match="alias"):  # the real client asks /api/validate-yaml first
        api.upload_file(path_or_fileobj=bomb, path_in_repo="README.md", repo_id=repo)
    assert api.list_repo_files(repo) == [".gitattributes"]

    fine = b"---\nlicense: mit\nshared: &t [a, b]\ntags: *t\ndate: 2024-05-01\n---\n# ok\n"
    assert _commit(hub.port, token, repo, {"README.md": fine})[0] == 200
    assert api.model_info(repo).card_data.to_dict() == {"license": "mit", "shared": ["a", "b"], "tags": ["a", "b"],
                                                        "date": "2024-05-01"}
    start = time.perf_counter()
    status, _, listing = _raw(hub.port, "GET", f"/api/models?full=true&search={repo.split('/')[1]}")  # anonymous
    assert status == 200 and time.perf_counter() - start < 5
    assert len(json.loads(listing)) == 1 and len(listing) < 64 * 1024


def test_old_data_dir_with_a_stored_bomb_readme_lists_small(tmp_path):
    """A README committed before cards were checked (record without "card") is parsed once, boundedly."""
    hub = serve(tmp_path / "d")
    token = hub.token_path.read_text().strip()
    api = HfApi(endpoint=hub.endpoint, token=token)
    repo = api.create_repo("legacy").repo_id
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n", path_in_repo="README.md", repo_id=repo)
    head = api.model_info(repo).sha
    with hub.storage.blobs.pinned() as pins:
        entry = hub.storage.blobs.put_bytes(_bomb_readme(), pins)
    hub.stop()
    record_path = tmp_path / "d/repos/model" / repo / "commits" / f"{head}.json"
    record = json.loads(record_path.read_text())
    record.pop("card")
    record["tree"]["README.md"] = entry
    record_path.write_text(json.dumps(record))
    hub = serve(tmp_path / "d")  # start-up garbage collection keeps the blob: the record references it
    try:
        start = time.perf_counter()
        status, _, data = _raw(hub.port, "GET", f"/api/models/{repo}")
        assert status == 200 and len(data) < 4096 and time.perf_counter() - start < 5
        assert "cardData" not in json.loads(data)
        assert len(_raw(hub.port, "GET", "/api/models?full=true")[2]) < 4096
    finally:
        hub.stop()


def test_hub_serve_on_a_busy_port_or_a_locked_data_dir_prints_one_line(tmp_path):
    running = serve(tmp_path / "held")
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        cases = {"busy port": ["--data-dir", str(tmp_path / "other"), "--port", str(running.port)],
                 "locked dir": ["--data-dir", str(tmp_path / "held"), "--port", str(_free_port())]}
        for what, args in cases.items():
            for module in (["hubforge.cli", "hub", "serve"], ["hubforge.hub"]):
                proc = subprocess.run([sys.executable, "-m", *module, *args], capture_output=True, text=True,
                                      timeout=60, env=env)
                assert proc.returncode == 1, (what, module, proc.stderr)
                assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
                assert ("--port" if what == "busy port" else "already served") in proc.stderr
        assert not (tmp_path / "other" / "users.json").exists()  # a server that did not start wrote nothing
    finally:
        running.stop()


def _fuzz_bodies(rng: random.Random) -> list[bytes]:
    header = json.dumps({"key": "header", "value": {"summary": "fuzz", "description": "d"}})
    ops = [json.dumps({"key": "file", "value": {"path": f"fuzz/{i}.txt", "content": "aGVsbG8=", "encoding": "base64"}})
           for i in range(3)]
    valid = "\n".join([header, *ops]).encode()
    deep = [b"[" * n + b"]" * n for n in (100, 5_000, 200_000)]
    bodies = [valid[:rng.randrange(len(valid))] for _ in range(80)]
    for _ in range(80):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        bodies.append(bytes(body))
    bodies += [os.urandom(rng.randint(1, 4096)) for _ in range(60)]
    for d in deep:
        bodies += [d, header.encode() + b"\n" + d,
                   b'{"key": "header", "value": {"summary": ' + d + b"}}",
                   header.encode() + b'\n{"key": "file", "value": {"path": ' + d + b', "content": ""}}',
                   header.encode() + b'\n{"key": ' + d + b', "value": {}}']
    for key, value in [("file", {"path": 1}), ("file", {"path": "a", "content": 5}), ("lfsFile", {"path": "a"}),
                       ("lfsFile", {"path": "a", "oid": "0" * 64, "size": "1"}), ("deletedFile", {"path": None}),
                       ("deletedFolder", {"path": ["x"]}), ("header", "str"), ([1], {}),
                       ("file", {"path": "a", "content": "", "encoding": ["base64"]})]:
        bodies.append(header.encode() + b"\n" + json.dumps({"key": key, "value": value}).encode())
    bodies += [b'{"key": "header", "value": {"summary": 1, "parentCommit": ["x"]}}', b"\n" * 1000, b""]
    return bodies


def test_fuzzed_commit_bodies_get_4xx_without_tracebacks_and_keep_the_repo(api, hub, token, cache_dir):
    repo = api.create_repo(_name("fuzz")).repo_id
    api.upload_file(path_or_fileobj=b"keep me\n", path_in_repo="keep.txt", repo_id=repo)
    big = os.urandom(11 * MB)
    api.upload_file(path_or_fileobj=big, path_in_repo="w.bin", repo_id=repo)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("hubforge.hub")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    bodies = _fuzz_bodies(random.Random(16))
    statuses = []
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
        for i, body in enumerate(bodies):
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}
            if i % 2:  # every other one chunked, in uneven pieces
                cut = sorted(rng_cut for rng_cut in {len(body) // 3, len(body) // 2} if 0 < rng_cut < len(body))
                pieces = [body[a:b] for a, b in zip([0, *cut], [*cut, len(body)])]
                conn.request("POST", f"/api/models/{repo}/commit/main", body=iter(pieces),
                             headers={**headers, "Transfer-Encoding": "chunked"}, encode_chunked=True)
            else:
                conn.request("POST", f"/api/models/{repo}/commit/main", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
            if r.getheader("Connection") == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
        conn.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"{len(bodies)} fuzzed commits took {elapsed:.0f} s"
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    assert statuses.count(400) > len(bodies) // 2
    tracebacks = [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    files = api.list_repo_files(repo)
    assert {"keep.txt", "w.bin"} <= set(files)
    path = hf_hub_download(repo, "keep.txt", endpoint=hub.endpoint, token=token, cache_dir=cache_dir)
    assert Path(path).read_bytes() == b"keep me\n"
    path = hf_hub_download(repo, "w.bin", endpoint=hub.endpoint, token=token, cache_dir=cache_dir)
    assert Path(path).read_bytes() == big
