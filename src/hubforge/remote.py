"""Run a recipe on Hugging Face Jobs and bring its run directory back.

    hubforge run RECIPE --remote hf-jobs [--flavor a10g-large] [--stages ...] [--set ...]

What happens, in order:
1. The code: the job runs this repository at the commit checked out here (`git rev-parse HEAD`). It clones
   `HUBFORGE_REPO_URL` (default: the `origin` remote, an SSH address turned into https; without a remote, the
   repository's own path, which only a job on this machine can read: the local Hub's) and checks the commit out,
   so the commit must be pushed there; uncommitted changes to tracked files, and a recipe, data file or local base
   that git does not track, are refused here, because the job would not see them. Its dependencies: when the
   image's `python` already imports them (the local Hub's jobs run this machine's Python), nothing is installed;
   otherwise `make install` with the CUDA build of torch runs in the job (image `python:3.11`: git, make, gcc;
   ~5 min for llama.cpp). `HUBFORGE_JOB_SETUP` replaces that command and `HUBFORGE_JOB_IMAGE` the image (e.g. an
   image built with the dependencies and `HUBFORGE_JOB_SETUP=true`).
2. The token: `HF_TOKEN` goes to the job as a *secret* (an environment variable the Hub keeps encrypted and never
   shows), never in its command or environment, so neither `inspect_job` nor the logs show it.
3. The logs stream to this console until the job ends; Ctrl-C cancels the job (and then exits 130).
4. The run directory: the job uploads `runs/<name>/<sha12>` to the private dataset repo `<you>/hubforge-runs`
   (`HUBFORGE_RESULTS_REPO` overrides) at `<name>/<sha12>/`, also when a stage failed, and this command downloads
   it with `snapshot_download` into the local `runs/`. A job has no other way to hand files back (its disk goes
   when it ends, its logs are text); a dataset repo is private, versioned (each attempt is a commit), reached with
   the same token and client as publishing, and served by the local Hub, so the whole path is tested offline.
   Before running, the job downloads what an earlier attempt uploaded there, so a re-run skips finished stages
   and resumes training from its last checkpoint, as a re-run on a self-hosted runner does.

Inside the job, `python -m hubforge.remote pull|push` are steps 4's two halves.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

from hubforge.redact import redact

REMOTES = ("hf-jobs",)
IMAGE = os.environ.get("HUBFORGE_JOB_IMAGE", "python:3.11")  # Debian with git, make and gcc for `make install`
SETUP = "make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"
TIMEOUT = os.environ.get("HUBFORGE_JOB_TIMEOUT", "6h")
TAIL_LINES = 20

# Runs in the job's working folder as `bash -c SCRIPT hubforge-job <hubforge run arguments>`.
SCRIPT = r"""set -euo pipefail
echo "hubforge job: $HUBFORGE_REPO_URL at $HUBFORGE_COMMIT"
git clone --quiet "$HUBFORGE_REPO_URL" hubforge && cd hubforge
git -c advice.detachedHead=false checkout --quiet "$HUBFORGE_COMMIT" || {
  echo "hubforge job: commit $HUBFORGE_COMMIT is not in $HUBFORGE_REPO_URL; push it first" >&2; exit 2; }
export PYTHONPATH="$PWD/src"
setup="$HUBFORGE_JOB_SETUP"
if [ "$setup" = auto ]; then
  if python -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
      torch transformers peft trl llama_cpp huggingface_hub 2>/dev/null; then setup=true
  else setup="$HUBFORGE_DEFAULT_SETUP"; fi
fi
echo "hubforge job: setup: $setup"
bash -c "$setup"
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
python -c 'import hubforge, sys; print("hubforge job: hubforge", hubforge.__version__, "from", hubforge.__file__, "on Python", sys.version.split()[0])'
python -m hubforge.remote pull
rc=0
python -m hubforge.cli run "$@" || rc=$?
python -m hubforge.remote push || { echo "hubforge job: the run directory could not be uploaded" >&2; [ "$rc" -ne 0 ] || rc=1; }
exit "$rc"
"""


class RemoteError(RuntimeError):
    """The run cannot be submitted, or the job did not complete; the message says what to do."""


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise RemoteError(f"git {' '.join(args)} in {root} failed: {done.stderr.strip()[:300]}")
    return done.stdout.strip()


def source(recipe_path: Path, recipe) -> tuple[str, str, str]:
    """(repository URL, commit, recipe path in the repository) after checking the job will see what runs here."""
    root = Path(_git(Path(recipe.root), "rev-parse", "--show-toplevel"))
    if dirty := _git(root, "status", "--porcelain", "--untracked-files=no"):
        raise RemoteError(f"the job runs a commit, and these changes are not committed:\n{dirty[:1000]}\n"
                          "commit and push them first")
    rel = os.path.relpath(Path(recipe_path).resolve(), root)
    local = [p for p in (recipe.base.model,) if p.startswith(("./", "../", "/"))] + list(recipe.data.files)
    for path in [rel] + [os.path.relpath((root / p).resolve(), root) for p in local]:
        if not _git(root, "ls-files", "--", path):
            raise RemoteError(f"{path} is not tracked by git, so the job would not have it: add and commit it")
    url = os.environ.get("HUBFORGE_REPO_URL") or _remote_url(root)
    if re.match(r"^[a-z+]+://[^/@]*:[^/@]*@", url):
        raise RemoteError("the repository URL holds credentials, which would show in the job's command; "
                          "set HUBFORGE_REPO_URL to an address without them")
    return url, _git(root, "rev-parse", "HEAD"), rel


def _remote_url(root: Path) -> str:
    done = subprocess.run(["git", "remote", "get-url", "origin"], cwd=root, capture_output=True, text=True)
    if done.returncode:
        return str(root)  # only a job on this machine (the local Hub's) can clone a path
    url = done.stdout.strip()
    return re.sub(r"^git@([^:]+):", r"https://\1/", url)  # the job has no SSH key


def run_remote(recipe_path: Path, recipe, remote: str, *, flavor: str, stages: str | None, overrides: list[str],
               force: bool, publish: bool, run_dir: Path, echo=print) -> Path:
    """Submit the run as a job, stream its logs, wait, download its run directory into `run_dir`; return it."""
    if remote not in REMOTES:
        raise RemoteError(f"--remote must be one of {', '.join(REMOTES)}, not {remote!r}")
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    url, commit, rel = source(recipe_path, recipe)
    token = get_token()
    if not token:
        raise RemoteError("Hugging Face Jobs need a token: set HF_TOKEN (or `hf auth login`)")
    api = HfApi(token=token)
    run_path = f"{recipe.name}/{recipe.sha256[:12]}"
    args = [rel, "--run-dir", f"runs/{run_path}", *(["--stages", stages] if stages else []),
            *[a for o in overrides for a in ("--set", o)], *(["--force"] if force else []),
            *(["--publish"] if publish else [])]
    try:
        namespace = api.whoami()["name"]
        results = os.environ.get("HUBFORGE_RESULTS_REPO") or f"{namespace}/hubforge-runs"
        api.create_repo(results, repo_type="dataset", private=True, exist_ok=True)
        env = {"HUBFORGE_REPO_URL": url, "HUBFORGE_COMMIT": commit, "HUBFORGE_RESULTS_REPO": results,
               "HUBFORGE_RUN_PATH": run_path, "HUBFORGE_JOB_SETUP": os.environ.get("HUBFORGE_JOB_SETUP", "auto"),
               "HUBFORGE_DEFAULT_SETUP": SETUP, "PYTHONUNBUFFERED": "1"}
        job = api.run_job(image=IMAGE, command=["bash", "-c", SCRIPT, "hubforge-job", *args], env=env,
                          secrets={"HF_TOKEN": token}, flavor=flavor, timeout=TIMEOUT, namespace=namespace,
                          name=re.sub(r"[^a-zA-Z0-9_-]", "-", f"hubforge-{recipe.name}"))
    except HfHubHTTPError as exc:
        raise RemoteError(f"submitting the job to {api.endpoint} failed: {redact(str(exc))}") from None
    echo(f"job {job.id} on {flavor}: {job.url}  (commit {commit[:12]}; Ctrl-C cancels it)")
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        for line in api.fetch_job_logs(job_id=job.id, namespace=namespace, follow=True):
            tail.append(redact(line.rstrip("\n")))
            echo(tail[-1])
        info = api.wait_for_job(job.id, namespace=namespace, poll_interval=2)
    except KeyboardInterrupt:
        echo(f"interrupted: cancelling job {job.id}")
        api.cancel_job(job_id=job.id, namespace=namespace)
        info = api.wait_for_job(job.id, namespace=namespace, poll_interval=1, timeout=60)
        echo(f"job {job.id}: {info.status.stage}")
        raise
    fetched = fetch_run(api, results, run_path, Path(run_dir))
    echo(f"run directory {'downloaded to ' + str(run_dir) if fetched else 'not uploaded by the job'} "
         f"(from dataset {results}, {run_path}/)")
    if info.status.stage != "COMPLETED":
        last = "\n".join(f"  {line}" for line in tail)
        raise RemoteError(f"job {job.id} ended {info.status.stage}: {info.status.message or 'no message'}\n"
                          f"last log lines:\n{last}\n(logs: hf jobs logs {job.id}; fix the cause and run the same "
                          "command again: the job resumes from the uploaded run directory)")
    return Path(run_dir)


def fetch_run(api, repo_id: str, run_path: str, dest: Path) -> bool:
    """Download `run_path/` of the dataset `repo_id` into `dest` (files there are replaced); False if absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.download"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        api.snapshot_download(repo_id, repo_type="dataset", allow_patterns=[f"{run_path}/*"], local_dir=tmp)
        got = tmp / run_path
        if not got.is_dir():
            return False
        for src in sorted(p for p in got.rglob("*") if p.is_file()):
            target = dest / src.relative_to(got)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    """`python -m hubforge.remote pull|push`, inside the job (env from run_remote, HF_TOKEN as a secret)."""
    from huggingface_hub import HfApi

    repo, run_path = os.environ["HUBFORGE_RESULTS_REPO"], os.environ["HUBFORGE_RUN_PATH"]
    local, api = Path("runs") / run_path, HfApi()
    if argv == ["pull"]:
        found = fetch_run(api, repo, run_path, local)
        print(f"hubforge job: {'resuming from' if found else 'no earlier attempt in'} {repo}/{run_path}")
    elif argv == ["push"]:
        if not local.is_dir():
            print(f"hubforge job: no run directory {local} to upload", file=sys.stderr)
            return 1
        api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=local, path_in_repo=run_path,
                          commit_message=f"{run_path}: run directory uploaded by a hubforge job")
        print(f"hubforge job: uploaded {local} to {repo}/{run_path}")
    else:
        print("usage: python -m hubforge.remote pull|push", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
