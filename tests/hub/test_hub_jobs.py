"""Jobs on the local Hub (hubforge/hub/jobs.py) and `hubforge run --remote hf-jobs` (hubforge/remote.py), offline.

The real client submits, streams, inspects, lists and cancels jobs that run as local subprocesses; the CLI runs
the `data` stage of a tiny recipe from a scratch git repository (src/ of this checkout, committed) as a job,
and its run directory comes back through a private dataset repo. The whole file takes well under a minute.

    PYTHONPATH=src .venv/bin/python -m pytest -m hub -q tests/hub/test_hub_jobs.py
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

pytestmark = pytest.mark.hub
REPO = Path(__file__).resolve().parents[2]
RECIPE = "recipes/tiny/jobs.yaml"
TINY = """name: tiny-jobs
base: {model: ./base}
data: {files: [recipes/data/chat.jsonl], format: messages, too_long: drop}
method: {name: lora}
train: {max_steps: 1, batch_size: 2, max_length: 64, save_steps: 1}
card: {languages: [fa], description: jobs test}
"""


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base) -> Path:
    """A git repository with this checkout's src/ and a tiny recipe, committed: what a job clones."""
    root = tmp_path_factory.mktemp("jobs") / "project"
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(tiny_base, root / "base")
    (root / "recipes" / "data").mkdir(parents=True)
    lines = (REPO / "recipes" / "data" / "persian-chat.jsonl").read_text("utf-8").splitlines()[:24]
    (root / "recipes" / "data" / "chat.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    (root / "recipes" / "tiny").mkdir()
    (root / RECIPE).write_text(TINY)
    (root / ".gitignore").write_text("/runs/\n")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "add", "-A")
    _git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "tiny")
    return root


def _cli(project: Path, token: str, *args: str, setup: str = "auto", popen: bool = False):
    env = {**os.environ, "HF_TOKEN": token, "PYTHONPATH": str(REPO / "src"), "HUBFORGE_JOB_SETUP": setup}
    cmd = [sys.executable, "-m", "hubforge.cli", "run", RECIPE, "--remote", "hf-jobs", "--flavor", "cpu-basic", *args]
    if popen:
        # Ctrl-C must reach the CLI as it does from a terminal: a test session started in the background by a
        # non-interactive shell (`nohup make test &`) has SIGINT ignored, and children inherit that, Python included.
        return subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=180)


def _job_id(output: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith("job "))


def _job_processes(hub) -> list:
    found = []
    for proc in psutil.process_iter(["cwd"]):
        if (proc.info["cwd"] or "").startswith(str(hub.data_dir / "jobs")):
            found.append(proc)
    return found


def test_remote_run_streams_logs_and_brings_the_run_directory_back(hub, api, token, project):
    done = _cli(project, token, "--stages", "data")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert token not in out + done.stderr
    job_id = _job_id(out)
    commit = _git(project, "rev-parse", "HEAD")
    assert f"at {commit}" in out and f"(commit {commit[:12]};" in out
    assert "/work/hubforge/src/hubforge/__init__.py" in out  # the commit's code, cloned into the job's folder
    assert "hubforge job: no earlier attempt in hubforge/hubforge-runs/tiny-jobs/" in out
    sha12 = next(p.name for p in (project / "runs" / "tiny-jobs").iterdir())
    manifest = json.loads((project / "runs" / "tiny-jobs" / sha12 / "manifest.json").read_text())
    assert manifest["stages"]["data"]["status"] == "done"
    assert (project / "runs" / "tiny-jobs" / sha12 / "data" / "train.jsonl").stat().st_size > 0
    assert f"downloaded to {project / 'runs' / 'tiny-jobs' / sha12}" in out  # absolute: where the command ran
    assert api.dataset_info("hubforge/hubforge-runs").private

    info = api.inspect_job(job_id=job_id, namespace="hubforge")
    assert info.status.stage == "COMPLETED" and info.flavor == "cpu-basic" and info.docker_image == "python:3.11"
    assert info.secrets == {"HF_TOKEN": "***"} and token not in json.dumps(info.command + [info.environment])
    logs = list(api.fetch_job_logs(job_id=job_id, namespace="hubforge"))
    assert any("data" in line for line in logs) and not any(token in line for line in logs)
    assert not (hub.data_dir / "jobs" / job_id / "work").exists()  # the scratch folder goes with the job

    again = _cli(project, token, "--stages", "data")  # a second attempt starts from the uploaded run directory
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"hubforge job: resuming from hubforge/hubforge-runs/tiny-jobs/{sha12}" in again.stdout
    assert "data" in again.stdout and "skipped" in again.stdout.lower()


def test_a_failing_job_reports_its_status_and_last_lines_and_its_run_directory_comes_back(api, token, project):
    done = _cli(project, token, "--stages", "data", "--set", "train.max_length=8")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ended ERROR: exit code 1" in done.stderr
    last = done.stderr.split("last log lines:")[1]
    assert "every training row is longer than train.max_length=8" in last
    sha12 = next(line for line in done.stdout.splitlines() if "downloaded to" in line).split("/tiny-jobs/")[1].split()[0]
    manifest = json.loads((project / "runs" / "tiny-jobs" / sha12 / "manifest.json").read_text())
    assert manifest["stages"]["data"]["status"] == "failed"

    setup = _cli(project, token, "--stages", "data", setup="echo preparing the image; exit 7")
    assert setup.returncode == 1 and "exit code 7" in setup.stderr and "preparing the image" in setup.stderr


def test_ctrl_c_cancels_the_job(hub, api, token, project):
    proc = _cli(project, token, "--stages", "data", setup="sleep 60", popen=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "hubforge job: setup: sleep 60" in line:
                break
        assert _job_processes(hub), "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    job_id = _job_id(out)
    assert f"interrupted: cancelling job {job_id}" in out and f"job {job_id}: CANCELED" in out
    assert api.inspect_job(job_id=job_id, namespace="hubforge").status.stage == "CANCELED"
    assert not _job_processes(hub)  # bash and its `sleep` are gone


def test_jobs_api_secrets_owner_only_limits_and_listing(hub, api, token):
    code = "import os; print('secret is', os.environ['MY_SECRET'], 'len', len(os.environ['MY_SECRET'])); print(os.environ['A'])"
    job = api.run_job(image="python:3.12", command=["python", "-c", code], env={"A": "visible"},
                      secrets={"MY_SECRET": "s3cr3t-value"}, labels={"suite": "jobs"})
    assert api.wait_for_job(job.id, timeout=30, poll_interval=0.2).status.stage == "COMPLETED"
    assert list(api.fetch_job_logs(job_id=job.id)) == ["secret is *** len 12", "visible"]
    shown = json.dumps(api.inspect_job(job_id=job.id).__dict__, default=str)
    assert "s3cr3t-value" not in shown and job.id in shown
    assert not any("s3cr3t-value" in p.read_text() for p in (hub.data_dir / "jobs" / job.id).rglob("*") if p.is_file())
    assert [j.id for j in api.list_jobs(namespace="hubforge", labels={"suite": "jobs"})] == [job.id]

    other = HfApi(endpoint=hub.endpoint, token=hub.create_user("jobs-other", "write"))
    for call in (lambda: other.inspect_job(job_id=job.id, namespace="hubforge"),
                 lambda: other.cancel_job(job_id=job.id, namespace="hubforge"),
                 lambda: list(other.fetch_job_logs(job_id=job.id, namespace="hubforge")),
                 lambda: other.run_job(image="x", command=["true"], namespace="hubforge")):
        with pytest.raises(HfHubHTTPError) as err:
            call()
        assert err.value.response.status_code in (403, 404)
    assert list(other.list_jobs(namespace="jobs-other")) == []

    slow = api.run_job(image="x", command=["bash", "-c", "echo start; sleep 30"], timeout=1)
    ended = api.wait_for_job(slow.id, timeout=30, poll_interval=0.2)
    assert (ended.status.stage, ended.status.message) == ("ERROR", "timed out after 1 s")
    failed = api.run_job(image="x", command=["bash", "-c", "echo last words; exit 3"])
    assert api.wait_for_job(failed.id, timeout=30, poll_interval=0.2).status.message == "exit code 3"
    missing = api.run_job(image="x", command=["no-such-command-here"])
    assert "cannot start" in api.wait_for_job(missing.id, timeout=30, poll_interval=0.2).status.message
    with pytest.raises(HfHubHTTPError, match="timeoutSeconds"):
        api.run_job(image="x", command=["true"], timeout="30d")


def test_logs_follow_a_running_job_and_are_bounded(hub, api):
    code = "import time\nfor i in range(3):\n    print('tick', i, flush=True); time.sleep(0.5)\nprint('x' * 5000)"
    job = api.run_job(image="x", command=["python", "-c", code])
    started = time.monotonic()
    lines = list(api.fetch_job_logs(job_id=job.id, follow=True))
    assert lines[:3] == ["tick 0", "tick 1", "tick 2"] and time.monotonic() - started < 20
    assert lines[3] == "x" * 5000
    cap, hub.limits.__dict__["max_job_log_bytes"] = hub.limits.max_job_log_bytes, 1000
    try:
        loud = api.run_job(image="x", command=["python", "-c", "print('y' * 400)\nfor i in range(50): print('z' * 400)"])
        api.wait_for_job(loud.id, timeout=30, poll_interval=0.2)
        kept = list(api.fetch_job_logs(job_id=loud.id))
    finally:
        hub.limits.__dict__["max_job_log_bytes"] = cap
    assert kept[0] == "y" * 400 and "bytes of output over the 1000-byte log limit were dropped" in kept[-1]
    assert len(kept) <= 4


def test_uncommitted_changes_are_refused_before_anything_is_submitted(api, token, project):
    recipe = project / RECIPE
    recipe.write_text(TINY.replace("max_steps: 1", "max_steps: 2"))
    try:
        done = _cli(project, token, "--stages", "data")
    finally:
        _git(project, "checkout", "--", RECIPE)
    assert done.returncode == 1 and "not committed" in done.stderr and RECIPE in done.stderr
    assert "job " not in done.stdout
