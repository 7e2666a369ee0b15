"""`hubforge changed BASE HEAD` against real temporary git repositories: every commit of a push (not only the
last), merges, renames, deletions, data files, a Persian file name, and the all-zeros `before` of a first push."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hubforge.changed import ChangedError, changed_recipes
from hubforge.cli import app

pytestmark = pytest.mark.unit
ZEROS = "0" * 40
RECIPE = "name: {name}\nbase: {{model: embedded:gemma-3-270m}}\ndata: {{files: [{data}], format: messages}}\nmethod: {{name: lora}}\n"


class Repo:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "t@example.com")
        self.git("config", "user.name", "t")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.path, check=True, capture_output=True, text=True).stdout.strip()

    def write(self, rel: str, text: str) -> None:
        (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.path / rel).write_text(text, encoding="utf-8")

    def recipe(self, rel: str, name: str, data: str = "recipes/data/a.jsonl") -> None:
        self.write(rel, RECIPE.format(name=name, data=data))

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def changed(self, base: str, head: str = "HEAD", **kw) -> dict[str, dict]:
        return {e["recipe"]: e for e in changed_recipes(base, head, self.path, **kw)}


@pytest.fixture
def repo(tmp_path) -> Repo:
    r = Repo(tmp_path / "repo")
    r.write("recipes/data/a.jsonl", '{"messages": []}\n')
    r.write("recipes/data/b.jsonl", '{"messages": []}\n')
    r.recipe("recipes/base/one.yaml", "one")
    r.recipe("recipes/base/two.yaml", "two", data="./recipes/data/b.jsonl")
    r.write("README.md", "hi\n")
    return r


def test_a_push_of_three_commits_reports_the_recipes_of_every_commit(repo):
    before = repo.commit("start")
    repo.recipe("recipes/base/three.yml", "three")
    repo.commit("a .yml recipe")
    repo.recipe("recipes/base/one.yaml", "one-changed")
    repo.commit("change one")
    repo.write("README.md", "docs only\n")
    after = repo.commit("docs")
    assert repo.changed(before, after) == {
        "recipes/base/one.yaml": {"recipe": "recipes/base/one.yaml", "change": "modified"},
        "recipes/base/three.yml": {"recipe": "recipes/base/three.yml", "change": "added"},
    }
    assert repo.changed(f"{after}~1", after) == {}  # what `git diff HEAD~1` saw: nothing


def test_a_merge_commit_brings_the_recipes_of_the_merged_branch(repo):
    before = repo.commit("start")
    repo.git("checkout", "-q", "-b", "feature")
    repo.recipe("recipes/other/new.yaml", "new")
    repo.commit("feature recipe")
    repo.git("checkout", "-q", "main")
    repo.write("README.md", "main moved on\n")
    repo.recipe("recipes/base/one.yaml", "one-on-main")
    repo.commit("main")
    # A pull request: only what the branch changed since it forked, whatever main did meanwhile.
    assert list(repo.changed("main", "feature", merge_base=True)) == ["recipes/other/new.yaml"]
    assert sorted(repo.changed("main", "feature")) == ["recipes/base/one.yaml", "recipes/other/new.yaml"]
    repo.git("merge", "-q", "--no-ff", "-m", "merge feature", "feature")
    assert sorted(repo.changed(before)) == ["recipes/base/one.yaml", "recipes/other/new.yaml"]
    assert list(repo.changed("HEAD^1")) == ["recipes/other/new.yaml"]  # the merge commit alone


def test_renames_count_deletions_do_not(repo):
    before = repo.commit("start")
    repo.git("mv", "recipes/base/one.yaml", "recipes/base/uno.yaml")
    repo.git("rm", "-q", "recipes/base/two.yaml")
    found = repo.changed(before, repo.commit("rename one, delete two"))
    assert found == {"recipes/base/uno.yaml": {"recipe": "recipes/base/uno.yaml", "change": "renamed",
                                               "from": "recipes/base/one.yaml"}}


def test_a_changed_data_file_reports_the_recipes_that_name_it(repo):
    before = repo.commit("start")
    repo.write("recipes/data/b.jsonl", '{"messages": [1]}\n')  # named as ./recipes/data/b.jsonl by two.yaml
    repo.write("recipes/data/unused.jsonl", "{}\n")
    found = repo.changed(before, repo.commit("new data"))
    assert found == {"recipes/base/two.yaml": {"recipe": "recipes/base/two.yaml", "change": "data",
                                               "data_files": ["recipes/data/b.jsonl"]}}
    repo.git("rm", "-q", "recipes/data/a.jsonl")  # one.yaml now names a missing file: it must be looked at
    assert list(repo.changed(repo.commit("drop a") + "~1")) == ["recipes/base/one.yaml"]


def test_persian_file_names_arrive_unquoted_and_in_json(repo, tmp_path):
    before = repo.commit("start")
    repo.recipe("recipes/فارسی/گفتگو.yaml", "persian")
    after = repo.commit("Persian recipe")
    assert list(repo.changed(before, after)) == ["recipes/فارسی/گفتگو.yaml"]
    result = CliRunner().invoke(app, ["changed", before, after, "--repo", str(repo.path)])
    assert result.exit_code == 0 and result.output == "recipes/فارسی/گفتگو.yaml\n"
    result = CliRunner().invoke(app, ["changed", before, after, "--repo", str(repo.path), "--json"])
    assert json.loads(result.output) == [{"recipe": "recipes/فارسی/گفتگو.yaml", "change": "added"}]


def test_all_zeros_before_is_a_first_push_every_recipe_is_new(repo):
    repo.write("recipes/broken.yaml", "{not: [valid")  # still a changed recipe; validate says why it is broken
    after = repo.commit("first")
    assert sorted(repo.changed(ZEROS, after)) == ["recipes/base/one.yaml", "recipes/base/two.yaml", "recipes/broken.yaml"]
    assert all(e["change"] == "added" for e in repo.changed(ZEROS, after).values())


def test_unknown_revisions_are_a_clear_error(repo):
    repo.commit("start")
    with pytest.raises(ChangedError, match="unknown revision 'deadbeef'.*fetch-depth: 0"):
        changed_recipes("deadbeef", "HEAD", repo.path)
    result = CliRunner().invoke(app, ["changed", "--repo", str(repo.path), "--", "--output=x", "HEAD"])
    assert result.exit_code != 0 and "is not a revision" in result.output
