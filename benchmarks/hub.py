"""Throughput and memory of the local Hub for one large file, against a plain disk copy in the same run.

    python benchmarks/hub.py --size-mb 500        # PYTHONPATH=src if hubforge is not installed

Starts the server in a subprocess (`python -m hubforge.hub`), uploads the file with the real `huggingface_hub`
client (Xet off: preupload -> LFS batch -> presigned PUT -> commit), downloads it back (302 to the /_cdn/ URL),
and prints MB/s for both, the same for `copy + fsync` on disk, the ratios, and the server's peak RSS
(VmHWM from /proc), which must stay far below the file size because bodies are streamed in 1 MiB chunks.
The upload time includes the client's own sha256 pass over the file.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MB):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hub-bench-", dir=args.workdir))
    port = _free_port()
    # The client reads these at import time: set them before importing huggingface_hub below.
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                      HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(work / "hf-home"))
    server = None
    try:
        src = work / "big.bin"
        block = os.urandom(MB)
        with open(src, "wb") as f:  # distinct blocks so nothing downstream can deduplicate
            for i in range(args.size_mb):
                f.write(i.to_bytes(8, "little") + block[8:])
        size = src.stat().st_size

        t = time.perf_counter()
        shutil.copyfile(src, work / "copy.bin")
        with open(work / "copy.bin", "rb+") as f:
            os.fsync(f.fileno())
        copy_s = time.perf_counter() - t

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                            os.environ.get("PYTHONPATH", "")])}
        server = subprocess.Popen([sys.executable, "-m", "hubforge.hub", "--data-dir", str(work / "hub"),
                                   "--port", str(port)], stdout=subprocess.PIPE, text=True, env=env)
        for line in server.stdout:
            if line.startswith("HF_ENDPOINT="):
                break
        threading.Thread(target=server.stdout.read, daemon=True).start()
        token = (work / "hub" / "token").read_text().strip()

        from huggingface_hub import HfApi, hf_hub_download

        api = HfApi(token=token)
        repo = api.create_repo("bench").repo_id
        t = time.perf_counter()
        api.upload_file(path_or_fileobj=src, path_in_repo="big.bin", repo_id=repo)
        up_s = time.perf_counter() - t
        rss_after_upload = _rss_kb(server.pid, "VmHWM")

        t = time.perf_counter()
        got = Path(hf_hub_download(repo, "big.bin", token=token, cache_dir=work / "cache"))
        down_s = time.perf_counter() - t
        assert got.stat().st_size == size and _sha256(got) == _sha256(src), "downloaded file differs"

        peak_kb, idle_kb = _rss_kb(server.pid, "VmHWM"), _rss_kb(server.pid, "VmRSS")
        mbps = lambda seconds: size / MB / seconds  # noqa: E731
        print(f"file: {size / MB:.0f} MB   (local disk under {work.parent})")
        print(f"disk copy+fsync : {mbps(copy_s):8.1f} MB/s  ({copy_s:.2f} s)")
        print(f"hub upload      : {mbps(up_s):8.1f} MB/s  ({up_s:.2f} s)   ratio to copy {copy_s / up_s:.2f}")
        print(f"hub download    : {mbps(down_s):8.1f} MB/s  ({down_s:.2f} s)   ratio to copy {copy_s / down_s:.2f}")
        print(f"server peak RSS : {peak_kb / 1024:.1f} MB (after upload {rss_after_upload / 1024:.1f} MB, "
              f"now {idle_kb / 1024:.1f} MB) = {peak_kb * 1024 / size:.1%} of the file size")
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
