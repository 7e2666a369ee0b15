"""The GitHub Actions workflows say what the README says: CI runs the README's test command, and the recipe PR job
installs everything `hubforge validate` and `hubforge plan` import (it installs a slim set, not the training stack)."""
from __future__ import annotations

import re
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


def steps(workflow: Path) -> list[dict]:
    return [step for job in yaml.safe_load(workflow.read_text())["jobs"].values() for step in job["steps"]]


def test_every_workflow_parses_and_names_its_steps():
    assert {w.name for w in WORKFLOWS} >= {"ci.yml", "recipe-pr.yml", "train-and-publish.yml"}
    for workflow in WORKFLOWS:
        for step in steps(workflow):
            assert "uses" in step or ("run" in step and step["run"].strip()), (workflow.name, step)


def test_ci_runs_the_readme_test_command():
    readme_test = re.search(r"^make test\b", (REPO / "README.md").read_text(), re.M)
    assert readme_test, "README.md lost its `make test` line"
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.M)
    assert any(re.fullmatch(r"(sudo )?make test", step.get("run", "").strip()) for step in steps(REPO / ".github/workflows/ci.yml"))


def test_workflow_inputs_never_reach_a_shell_script_unquoted():
    # `${{ github.event.inputs.* }}` pasted into `run:` is script injection; such values go through `env:`.
    for workflow in WORKFLOWS:
        for step in steps(workflow):
            assert "github.event.inputs" not in step.get("run", ""), (workflow.name, step.get("name"))
            assert "github.head_ref" not in step.get("run", ""), (workflow.name, step.get("name"))


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


def test_recipe_pr_job_installs_what_validate_and_plan_import():
    run = "\n".join(step.get("run", "") for step in steps(REPO / ".github/workflows/recipe-pr.yml"))
    installed = {canonicalize_name(re.split(r"[=<>\[]", token)[0])
                 for line in re.findall(r"pip install ([^\n&]+)", run) for token in line.split()
                 if not token.startswith("-") and token not in (".", "-e")}
    assert installed, "recipe-pr.yml installs nothing"
    allowed = closure(installed) | {"hubforge"} | INTERPRETER
    # The job's commands in a fresh interpreter where every other installed distribution cannot be imported, as on
    # the job's runner (optional imports such as httpx2's brotli fall back exactly as they would there).
    probe = r"""
import glob, sys
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
for path in sorted(glob.glob("recipes/**/*.yaml", recursive=True)):
    result = runner.invoke(app, ["plan", path, "--format", "markdown"])
    assert result.exit_code == 0, (path, result.output, result.exception)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", probe, ",".join(sorted(allowed))], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]
