"""Which recipes a range of commits added, modified or renamed: what the GitHub workflows plan, train and publish.

    hubforge changed BASE HEAD              # one recipe path per line
    hubforge changed BASE HEAD --json       # [{"recipe", "change", "from"?, "data_files"?}, ...]
    hubforge changed --merge-base origin/main HEAD   # a pull request: what HEAD changed since it forked off

A push event's range is `before..after` (every commit of the push, merges included, not only the last one).
A BASE of forty zeros is how GitHub names "nothing before" (the first push of a branch): every recipe at HEAD
counts as added. A recipe counts as changed when its own file (`recipes/**/*.yaml` or `*.yml`) was added,
modified or renamed, or when a local file it names under `recipes/data/` changed (deleted data too: the recipe
now fails and must be looked at). Deleted recipes are left out: there is nothing to train. Paths come from
`git diff -z`, so non-ASCII names arrive as they are, never C-quoted. Recipes at HEAD are read from git, not
from the working tree, and only as YAML data (an invalid recipe is still reported; `validate` says why).
"""
from __future__ import annotations

import posixpath
import re
import subprocess
from pathlib import Path

import yaml

RECIPES, DATA = "recipes/", "recipes/data/"
ZEROS = re.compile(r"0{40}|0{64}")
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's well-known empty tree (SHA-1 repositories)


class ChangedError(Exception):
    """A revision git does not know, or a folder that is not a git repository."""


def _git(repo: Path, *args: str) -> bytes:
    out = subprocess.run(["git", "-c", "core.quotepath=false", *args], cwd=repo, capture_output=True)
    if out.returncode:
        raise ChangedError(f"git {' '.join(args)} failed in {repo}: {out.stderr.decode('utf-8', 'replace').strip()}")
    return out.stdout


def _resolve(repo: Path, rev: str) -> str:
    if not rev or rev.startswith("-"):
        raise ChangedError(f"{rev!r} is not a revision")
    try:
        return _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()
    except ChangedError:
        raise ChangedError(f"unknown revision {rev!r} in {repo} (a shallow clone? fetch with fetch-depth: 0)") from None


def is_recipe(path: str) -> bool:
    return path.startswith(RECIPES) and not path.startswith(DATA) and path.endswith((".yaml", ".yml"))


def _diff(repo: Path, base: str, head: str) -> list[tuple[str, str, str | None]]:
    """(status letter, path at HEAD, old path for renames) for every file that differs, from `git diff -z`."""
    fields = _git(repo, "diff", "-z", "--no-ext-diff", "--name-status", "-M", base, head).decode("utf-8").split("\0")
    out, i = [], 0
    while i < len(fields) and fields[i]:
        status = fields[i][0]
        if status in "RC":
            out.append((status, fields[i + 2], fields[i + 1]))
            i += 3
        else:
            out.append((status, fields[i + 1], None))
            i += 2
    return out


def _local_paths(value) -> set[str]:
    """Every string in a recipe, normalised as a repository-relative path (data.files, include paths, ...)."""
    if isinstance(value, dict):
        return set().union(*map(_local_paths, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_local_paths, value)) if value else set()
    return {posixpath.normpath(value.strip())} if isinstance(value, str) and value.strip() else set()


def _uses(recipe_paths: set[str], data_file: str) -> bool:
    return any(data_file == p or data_file.startswith(p.rstrip("/") + "/") for p in recipe_paths if p.startswith(DATA))


def _recipes_at(repo: Path, head: str) -> dict[str, set[str]]:
    """recipe path at HEAD -> the local paths it names (empty when the file is not a YAML mapping)."""
    names = _git(repo, "ls-tree", "-r", "-z", "--name-only", head, "--", RECIPES).decode("utf-8").split("\0")
    out = {}
    for name in filter(is_recipe, names):
        try:
            data = yaml.safe_load(_git(repo, "show", f"{head}:{name}"))
        except (yaml.YAMLError, UnicodeDecodeError, ChangedError):
            data = None
        out[name] = _local_paths(data) if isinstance(data, dict) else set()
    return out


def changed_recipes(base: str, head: str, repo: Path = Path("."), merge_base: bool = False) -> list[dict]:
    """[{"recipe": path, "change": added|modified|renamed|data, "from"?: old path, "data_files"?: [...]}], by path."""
    repo = Path(repo)
    head_sha = _resolve(repo, head)
    if ZEROS.fullmatch(base or ""):
        base_sha = EMPTY_TREE
    else:
        base_sha = _resolve(repo, base)
        if merge_base:
            base_sha = _git(repo, "merge-base", base_sha, head_sha).decode().strip()
    found: dict[str, dict] = {}
    data_changes = []
    for status, path, old in _diff(repo, base_sha, head_sha):
        data_changes += [p for p in (path, old) if p and p.startswith(DATA)]
        if status == "D" or not is_recipe(path):
            continue
        change = {"A": "added", "C": "added", "R": "renamed"}.get(status, "modified")
        found[path] = {"recipe": path, "change": change} | ({"from": old} if status == "R" else {})
    if data_changes:
        for recipe, paths in _recipes_at(repo, head_sha).items():
            used = sorted(f for f in data_changes if _uses(paths, f))
            if used:
                found.setdefault(recipe, {"recipe": recipe, "change": "data"})["data_files"] = used
    return [found[k] for k in sorted(found)]
