"""The workflows' own `run:` steps, executed in order in a scratch git clone by tests/fixtures/workflow_runner.py
(GitHub's variables, an event payload, `env:` and `if:` evaluated; `uses:` steps replaced by the stand-ins
that module lists, install commands by its SUBSTITUTES). This proves the commands exist, the shell is right and
the workflows connect, which parsing the YAML cannot.

    PYTHONPATH=src .venv/bin/python -m pytest -m workflows -q tests/test_workflows_run.py

Cases: a fork PR with a good recipe (the comment equals tests/fixtures/workflows/good-pr-comment.md, posted once and
updated in place), a PR with a bad recipe (errors with file:line:col, the check fails, the comment still comes),
hostile artifacts (refused), a 3-commit push to main with two recipes (both trained for a step on the tiny model
against a local Hub, no token in the training step, dry run in the summary), the same with HUBFORGE_RUNNER=hf-jobs
(trained in a job of the local Hub, only HF_JOBS_TOKEN in the submitting step), and a push touching only space/
(the published recipe's Space redeployed on the local Hub, nothing trained).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "space"))
from space_testing import tiny_gguf  # noqa: E402,F401
from workflow_runner import SUBSTITUTES, WorkflowRunner  # noqa: E402

pytestmark = pytest.mark.workflows
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
GOLDEN = REPO / "tests" / "fixtures" / "workflows" / "good-pr-comment.md"
MARKER = "<!-- hubforge-recipe-plan -->"
GOOD = (REPO / "recipes" / "gemma-3-270m" / "dolly-lora.yaml").read_text().replace(
    "name: gemma-3-270m-dolly", "name: gemma-3-270m-dolly-r8").replace("r: 16", "r: 8")
BAD = "name: Bad Name\nbase: {model: embedded:gemma-3-270m}\ndata: {files: [recipes/data/chat.jsonl]}\nmethod: {name: lora, lora: {r: -1}}\n"
TINY = """name: tiny-{name}
base: {{model: ./base}}
data: {{files: [recipes/data/chat.jsonl], format: messages}}
method: {{name: lora}}
train: {{max_steps: 1, batch_size: 2, max_length: 64, save_steps: 1}}
eval: {{max_samples: 2}}
card: {{languages: [fa], description: workflow test}}
space: {{examples: ["سلام"]}}
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit(cwd: Path, message: str) -> str:
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "-m", message)
    return git(cwd, "rev-parse", "HEAD")


@pytest.fixture
def clone(tmp_path, tiny_base) -> Path:
    """A repository holding this checkout's workflows, Makefile, space/, cards/ and recipes, plus the tiny base."""
    root = tmp_path / "clone"
    root.mkdir()
    for part in (".github", "space", "cards", "recipes"):
        shutil.copytree(REPO / part, root / part)
    for part in ("Makefile", "pyproject.toml", ".gitignore", "README.md"):
        shutil.copy2(REPO / part, root / part)
    shutil.copytree(tiny_base, root / "base")
    (root / "base" / "hubforge-base.json").write_text('{"hub_id": "google/gemma-3-270m", "license": "gemma"}')
    lines = (REPO / "recipes" / "data" / "persian-chat.jsonl").read_text("utf-8").splitlines()[:24]
    (root / "recipes" / "data" / "chat.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "ci@example.com")
    git(root, "config", "user.name", "ci")
    commit(root, "main as it is")
    return root


def pr_event(number: int, base: str, head: str, fork: bool = True) -> dict:
    return {"number": number, "pull_request": {
        "number": number, "base": {"ref": "main", "sha": base},
        "head": {"ref": "patch-1", "sha": head, "repo": {"fork": fork, "full_name": "someone/hubforge" if fork else "hubforge/hubforge"}}},
        "repository": {"full_name": "hubforge/hubforge", "fork": False}}


def open_pr(clone: Path, tmp_path: Path, files: dict[str, str], number: int = 7, run_id: int = 1000):
    """Commit `files` on a branch (a fork's, as far as the event says) and run recipe-pr.yml on it."""
    base = git(clone, "rev-parse", "main")
    git(clone, "checkout", "-q", "-B", f"pr-{number}", base)
    for rel, text in files.items():
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        (clone / rel).write_text(text, "utf-8")
    head = commit(clone, f"PR {number}")
    runner = WorkflowRunner(clone, tmp_path / "work", event_name="pull_request", event=pr_event(number, base, head),
                            ref=f"refs/pull/{number}/merge", sha=head, run_id=run_id)
    state = json.loads(runner.api_state.read_text())
    state["pulls"][str(number)] = {"head": {"sha": head}}
    runner.api_state.write_text(json.dumps(state))
    return runner.run(WORKFLOWS / "recipe-pr.yml")["recipes"][0], head


def post_comment(tmp_path: Path, clone: Path, run_id: int, head: str, conclusion: str):
    event = {"workflow_run": {"id": run_id, "event": "pull_request", "conclusion": conclusion, "head_sha": head},
             "repository": {"full_name": "hubforge/hubforge", "fork": False}}
    runner = WorkflowRunner(clone, tmp_path / "work", event_name="workflow_run", event=event, ref="refs/heads/main",
                            sha=git(clone, "rev-parse", "main"), run_id=run_id + 1)
    job = runner.run(WORKFLOWS / "recipe-pr-comment.yml")["comment"][0]
    return job, json.loads(runner.api_state.read_text())["comments"]


def test_a_fork_pr_with_a_good_recipe_gets_the_plan_as_one_sticky_comment(clone, tmp_path):
    job, head = open_pr(clone, tmp_path, {"recipes/gemma-3-270m/dolly-lora-r8.yaml": GOOD})
    assert job.status == "success", [(s.name, s.outcome, s.output[-2000:]) for s in job.steps]
    assert [s.substituted for s in job.steps if s.substituted] == [
        "pip install -e . --no-deps && pip install jsonschema==4.26.0 PyYAML==6.0.3 typer==0.29.2 huggingface-hub==2.4.0 psutil==7.2.2"]
    assert job.step("Recipes this pull request changes").output.strip() == "recipes/gemma-3-270m/dolly-lora-r8.yaml"
    assert job.step("The check fails").outcome == "skipped"
    comment_job, comments = post_comment(tmp_path, clone, 1000, head, "success")
    assert comment_job.status == "success", [(s.name, s.outcome, s.output[-2000:]) for s in comment_job.steps]
    body = comments["7"][0]["body"]
    if os.environ.get("HUBFORGE_UPDATE_GOLDENS") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(body.removeprefix(MARKER + "\n"), "utf-8")
    assert body == MARKER + "\n" + GOLDEN.read_text("utf-8")
    # A second push to the same PR updates the one comment instead of adding another.
    job, head = open_pr(clone, tmp_path, {"recipes/gemma-3-270m/dolly-lora-r8.yaml": GOOD.replace("r: 8", "r: 4")}, run_id=1002)
    _, comments = post_comment(tmp_path, clone, 1002, head, "success")
    assert len(comments["7"]) == 1 and "r=4" in comments["7"][0]["body"]


def test_a_pr_with_a_bad_recipe_lists_its_errors_and_fails_the_check(clone, tmp_path):
    job, head = open_pr(clone, tmp_path, {"recipes/community/bad.yaml": BAD}, number=8)
    assert job.status == "failure" and job.step("The check fails").outcome == "failure"
    assert job.step("actions/upload-artifact").outcome == "success"  # the comment still gets out
    comment_job, comments = post_comment(tmp_path, clone, 1000, head, "failure")
    assert comment_job.status == "success"
    body = comments["8"][0]["body"]
    assert "### ❌ `recipes/community/bad.yaml` is not a valid recipe" in body
    assert "recipes/community/bad.yaml:1:7: name: 'Bad Name' is not allowed" in body
    assert "recipes/community/bad.yaml:4:32: method.lora.r: -1 is less than the minimum of 1" in body
    assert "Other recipes fail" not in body  # listed once, under the changed recipe


@pytest.mark.parametrize("pr_number, planned, refusal", [
    ("$(id)", True, "PR number is not an integer"),
    ("7" * 17, True, "larger than a plan comment can be"),
    ("8", True, "planned"),  # the artifact names another PR whose head is not the commit that was planned
    ("7", False, "no plain file body.md"),
])
def test_the_comment_workflow_refuses_hostile_artifacts(clone, tmp_path, pr_number, planned, refusal):
    job, head = open_pr(clone, tmp_path, {"recipes/gemma-3-270m/dolly-lora-r8.yaml": GOOD})
    artifact = tmp_path / "work" / "artifacts" / "1000" / "recipe-pr-comment"
    (artifact / "pr-number").write_text(pr_number)
    if not planned:
        (artifact / "body.md").unlink()
        (artifact / "body.md").mkdir()
    state = json.loads((tmp_path / "work" / "github-api.json").read_text())
    state["pulls"]["8"] = {"head": {"sha": "f" * 40}}
    (tmp_path / "work" / "github-api.json").write_text(json.dumps(state))
    comment_job, comments = post_comment(tmp_path, clone, 1000, head, "success")
    assert comments == {} or all(not c for c in comments.values())
    assert refusal in "".join(s.output for s in comment_job.steps)


@pytest.fixture
def local_hub(tmp_path):
    from hubforge.hub import serve
    from hubforge.space_runner import SpaceRunner

    hub = serve(tmp_path / "hub-data")
    runner = SpaceRunner.attach(hub, start_timeout=120)
    yield hub
    runner.stop_all()
    hub.stop()


def machine_env(hub, tmp_path) -> dict:
    """What the self-hosted runner's own environment says: where the Hub is (here: the local one)."""
    return {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "HUBFORGE_SPACE_TIMEOUT": "150"}


def push_event(before: str, after: str) -> dict:
    return {"before": before, "after": after, "ref": "refs/heads/main", "repository": {"full_name": "hubforge/hubforge", "fork": False}}


def test_a_three_commit_push_trains_both_recipes_without_the_token(clone, tmp_path, local_hub):
    before = git(clone, "rev-parse", "HEAD")
    (clone / "recipes" / "tiny").mkdir()
    (clone / "recipes" / "tiny" / "one.yaml").write_text(TINY.format(name="one"), "utf-8")
    commit(clone, "recipe one")
    (clone / "recipes" / "tiny" / "two.yml").write_text(TINY.format(name="two"), "utf-8")
    commit(clone, "recipe two")
    (clone / "README.md").write_text("docs\n")
    after = commit(clone, "docs")
    runner = WorkflowRunner(clone, tmp_path / "work", event_name="push", event=push_event(before, after), ref="refs/heads/main",
                            sha=after, secrets={"HF_TOKEN": local_hub.token_path.read_text().strip()},
                            variables={"HUBFORGE_SMOKE_STAGES": "data,train"}, machine_env=machine_env(local_hub, tmp_path))
    jobs = runner.run(WORKFLOWS / "train-and-publish.yml")
    assert json.loads(jobs["recipes"][0].outputs["recipes"]) == ["recipes/tiny/one.yaml", "recipes/tiny/two.yml"]
    assert [j.matrix["recipe"] for j in jobs["train"]] == ["recipes/tiny/one.yaml", "recipes/tiny/two.yml"]
    for i, job in enumerate(jobs["train"]):
        assert job.status == "success", [(s.name, s.outcome, s.output[-3000:]) for s in job.steps]
        assert [s.substituted for s in job.steps if s.substituted] == ["make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"]
        training = job.step("Train")
        assert training.outcome == "success" and "HF_TOKEN" not in training.env_keys
        assert job.step("Publish the three repos").outcome == "skipped"  # a smoke run never publishes
        assert "| train | done |" in job.summary and "Smoke run (data,train): nothing to publish" in job.summary
        assert "publish gate" in job.summary  # the dry run says why nothing can be published yet
        manifest = json.loads((tmp_path / "work" / "artifacts" / "1000" / f"run-{i}" / "manifest.json").read_text())
        assert manifest["stages"]["train"]["result"]["steps"] == 1
    assert not any(local_hub.data_dir.rglob("*.safetensors"))  # nothing reached the Hub


def test_a_push_touching_only_space_redeploys_the_published_space(clone, tmp_path, local_hub, tiny_gguf, monkeypatch):
    from huggingface_hub import HfApi, constants

    from hubforge.pipeline import default_run_dir
    from hubforge.recipe import load_recipe
    from hubforge.rundir import RunDir

    (clone / "recipes" / "tiny").mkdir()
    (clone / "recipes" / "tiny" / "one.yaml").write_text(TINY.format(name="one"), "utf-8")
    before = commit(clone, "recipe one")
    # What train-and-publish left on the runner: a published run directory and its GGUF repo on the Hub.
    recipe = load_recipe(clone / "recipes" / "tiny" / "one.yaml")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the local Hub speaks LFS, not Xet
    api = HfApi(endpoint=local_hub.endpoint, token=local_hub.token_path.read_text().strip())
    gguf_repo, gguf_file = f"hubforge/{recipe.name}-GGUF", f"{recipe.name}-Q4_K_M.gguf"
    api.create_repo(gguf_repo)
    api.upload_file(path_or_fileobj=str(tiny_gguf), path_in_repo=gguf_file, repo_id=gguf_repo)
    run_dir = RunDir.open(clone / default_run_dir(recipe))
    entry = {"file": f"gguf/{gguf_file}", "type": "Q4_K_M", "size": tiny_gguf.stat().st_size, "perplexity": 12.5}
    run_dir.mark("gguf", status="done", result={"files": [entry]})
    run_dir.mark("publish", status="done", result={"repos": {"gguf": {"repo_id": gguf_repo, "files": [gguf_file]}}})
    (clone / "space" / "NOTE.md").write_text("a Space change\n")
    after = commit(clone, "space only")
    runner = WorkflowRunner(clone, tmp_path / "work", event_name="push", event=push_event(before, after), ref="refs/heads/main",
                            sha=after, secrets={"HF_TOKEN": api.token}, machine_env=machine_env(local_hub, tmp_path))
    on = yaml.safe_load((WORKFLOWS / "space.yml").read_text())[True]
    assert on["push"]["paths"] == ["space/**", "cards/templates/space-*"]
    job = runner.run(WORKFLOWS / "space.yml")["deploy"][0]
    assert job.status == "success", [(s.name, s.outcome, s.output[-3000:]) for s in job.steps]
    assert "- recipes/tiny/one.yaml" in job.summary and "RUNNING" in job.summary
    assert api.get_space_runtime(recipe.space.id).stage == "RUNNING"
    stages = RunDir.open(run_dir.path).manifest["stages"]
    assert stages["space"]["status"] == "done" and "train" not in stages  # redeployed, nothing trained


def test_a_push_with_the_hf_jobs_runner_trains_in_a_job_with_only_the_jobs_token(clone, tmp_path, local_hub):
    # What a job clones must hold this checkout's code (the job runs `python -m hubforge` from its clone's src/).
    shutil.copytree(REPO / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__"))
    before = commit(clone, "with src")
    (clone / "recipes" / "tiny").mkdir()
    (clone / "recipes" / "tiny" / "one.yaml").write_text(TINY.format(name="one"), "utf-8")
    after = commit(clone, "recipe one")
    from huggingface_hub import HfApi

    jobs_token = local_hub.token_path.read_text().strip()
    runner = WorkflowRunner(clone, tmp_path / "work", event_name="push", event=push_event(before, after), ref="refs/heads/main",
                            sha=after, secrets={"HF_JOBS_TOKEN": jobs_token, "HF_TOKEN": "hf_never_used_in_a_smoke_run"},
                            variables={"HUBFORGE_RUNNER": "hf-jobs", "HUBFORGE_SMOKE_STAGES": "data,train",
                                       "HUBFORGE_JOBS_FLAVOR": "cpu-basic"},
                            machine_env={**machine_env(local_hub, tmp_path), "HUBFORGE_JOB_SETUP": "true"})
    jobs = runner.run(WORKFLOWS / "train-and-publish.yml")
    assert [j.status for j in jobs["train"]] == ["skipped"]  # the self-hosted runner is not asked
    job = jobs["train-hf-jobs"][0]
    assert job.status == "success", [(s.name, s.outcome, s.output[-3000:]) for s in job.steps]
    assert [s.substituted for s in job.steps if s.substituted] == ["make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"]
    training = job.step("Train")
    assert "HF_TOKEN" in training.env_keys and "job " in training.output and jobs_token not in training.output
    assert all("HF_TOKEN" not in s.env_keys for s in job.steps if s is not training and s.outcome != "skipped")
    assert job.step("Publish the three repos").outcome == "skipped"  # a smoke run never publishes
    assert "| train | done |" in job.summary and "Smoke run (data,train): nothing to publish" in job.summary
    manifest = json.loads((tmp_path / "work" / "artifacts" / "1000" / "run-0" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["result"]["steps"] == 1  # trained in the job, brought back to the runner
    api = HfApi(endpoint=local_hub.endpoint, token=jobs_token)
    assert api.dataset_info("hubforge/hubforge-runs").private  # how the run directory came back
    assert [j.status.stage for j in api.list_jobs(namespace="hubforge")] == ["COMPLETED"]


def test_the_summary_says_which_credential_published_each_repo(tmp_path):
    wf = yaml.safe_load((WORKFLOWS / "train-and-publish.yml").read_text())
    scripts = {s["run"] for j in ("train", "train-hf-jobs") for s in wf["jobs"][j]["steps"]
               if s.get("name", "").startswith("Which credential")}
    assert len(scripts) == 1  # both jobs say it the same way
    script = scripts.pop()
    publish = {"repos": {"adapter": {"repo_id": "hubforge/x-lora", "credential": "oidc"},
                         "merged": {"repo_id": "hubforge/x", "credential": "token"}}}
    for stages, rows in (({"publish": {"result": publish}, "space": {"result": {"space_id": "hubforge/x-demo", "credential": "oidc"}}},
                          ["| hubforge/x-lora | Trusted Publisher (OIDC token of this repo) |", "| hubforge/x | HF_TOKEN |",
                           "| spaces/hubforge/x-demo | Trusted Publisher (OIDC token of this repo) |"]),
                         ({"publish": {"status": "failed"}, "space": {"result": {"status": "not_applicable"}}}, [])):
        (tmp_path / "manifest.json").write_text(json.dumps({"stages": stages}))
        summary = tmp_path / "summary.md"
        summary.unlink(missing_ok=True)
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                              env={**os.environ, "RUN_DIR": str(tmp_path), "GITHUB_STEP_SUMMARY": str(summary)},
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert [line for line in summary.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:] == rows


def test_the_substitution_list_stays_tiny():
    assert len(SUBSTITUTES) == 2
