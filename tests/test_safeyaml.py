"""The bounded YAML loader and the recipe validator facing alias bombs, deep nesting and random bytes.

Time bounds are safety bounds with wide margins: before the loader, the 8-level bomb took 46 s and the 9-level
one was killed after 300 s at 2.4 GB; refused while composing, both take milliseconds.
"""
from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hubforge.recipe import RecipeError, load_recipe
from hubforge.safeyaml import BoundedYAMLError, load

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
MINIMAL = REPO / "tests/fixtures/recipes/good/minimal.yaml"


def bomb(levels: int, key: str = "lol") -> str:
    """~50 bytes per level; expands to 10**(levels+1) scalars."""
    lines = [f'{key}0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{key}{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [8, 9])
def test_alias_bomb_is_refused_while_composing(levels):
    start = time.perf_counter()
    with pytest.raises(BoundedYAMLError) as err:
        load(bomb(levels), max_alias_cost=10_000)
    assert time.perf_counter() - start < 2.0
    assert err.value.problem_mark.line == 3 and "alias *a2" in err.value.problem  # the first alias past the budget


def test_aliases_within_the_budget_load_and_merge_keys_count_too():
    node, data = load("base: &b {lr: 1, steps: 2}\nrun: {<<: *b, steps: 3}\nagain: *b\n")
    assert data == {"base": {"lr": 1, "steps": 2}, "run": {"lr": 1, "steps": 3}, "again": {"lr": 1, "steps": 2}}
    assert node.start_mark.line == 0
    merges = "a0: &a0 {x: 1, y: 2}\n" + "".join(f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}\n" for i in range(1, 40))
    with pytest.raises(BoundedYAMLError, match="expand this document"):
        load(merges)  # flattening these merge keys would build 2**40 entries


def test_a_long_scalar_repeated_by_aliases_counts_its_length():
    text = f"a: &a {'x' * 5000}\nb: [*a, *a, *a]\n"
    with pytest.raises(BoundedYAMLError):
        load(text, max_alias_cost=10_000)
    assert load(text, max_alias_cost=20_000)[1]["b"][2] == "x" * 5000


@pytest.mark.parametrize("text, problem", [
    ("a: &a [1, *a]\n", "recursive alias"),
    ("x: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than"),
    ("x: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested more than"),
    ("x: " + "9" * 5000 + "\n", "cannot be read"),
    ("a: &x 1\nb: *x\n", "is not allowed"),
])
def test_what_else_is_refused_gets_a_position(text, problem):
    with pytest.raises(BoundedYAMLError) as err:
        load(text, max_alias_cost=0 if "*x" in text else 10_000)
    assert problem in str(err.value) and err.value.problem_mark is not None


def _recipe_with(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "recipes/data").mkdir(parents=True)
    (tmp_path / "recipes/data/persian-chat.jsonl").write_text("{}\n")
    path = tmp_path / "bomb.yaml"
    path.write_text(MINIMAL.read_text("utf-8") + extra, "utf-8")
    return path


def test_recipes_refuse_aliases_with_file_line_col(tmp_path):
    path = _recipe_with(tmp_path, "card: &c {languages: [fa]}\n")
    assert load_recipe(path, root=tmp_path).card  # an anchor alone is harmless
    path.write_text(path.read_text() + "x_copy: *c\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, root=tmp_path)
    line = len(path.read_text().splitlines())
    assert err.value.problems == [f"{path}:{line}:9: malformed YAML: alias *c is not allowed: write the value "
                                  "out where it is used"]


@pytest.mark.parametrize("levels", [8, 9])
def test_cli_validate_answers_an_alias_bomb_at_once_in_one_short_line(tmp_path, levels):
    path = _recipe_with(tmp_path, bomb(levels, key="x_bomb"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hubforge.cli", "validate", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    elapsed = time.perf_counter() - start  # mostly interpreter start-up and imports
    assert proc.returncode == 1 and elapsed < 60
    assert len(proc.stdout) + len(proc.stderr) < 1000 and "Traceback" not in proc.stderr
    assert f"{path}:{len(MINIMAL.read_text().splitlines()) + 2}:" in proc.stderr
    assert "alias *a0 is not allowed" in proc.stderr


def test_fuzzed_recipes_give_recipe_errors_not_tracebacks(tmp_path):
    """Truncations and YAML syntax (anchors, aliases, brackets, tabs, control bytes) spliced into a real recipe:
    each load ends in a Recipe or a RecipeError with short problems."""
    rng = random.Random(16)
    base = (REPO / "recipes/gemma-3-270m/persian-chat-lora.yaml").read_bytes()
    tokens = [b"&a ", b"*a", b"[", b"]", b"{", b"}", b": ", b"- ", b"\t", b"\n  ", b"!!python/object ", b"<<: ",
              b"\x00", b"\xff\xfe", b"'", b'"', b"99999999999999999999", b"? ", b"|\n", b"%YAML 1.1\n", b"---\n"]
    cases = [base[:rng.randrange(len(base))] for _ in range(60)]
    for _ in range(90):
        pieces = [base]
        for _ in range(rng.randint(1, 6)):
            text, at = pieces.pop(), rng.randrange(len(base))
            pieces.append(text[:at] + rng.choice(tokens) + text[at + rng.randint(0, 3):])
        cases.append(pieces[0])
    cases += [b"train: " + b"[" * n for n in (10, 1000, 100_000)] + [b"- " * 50_000, bomb(12).encode()]
    path = tmp_path / "fuzz.yaml"
    start = time.perf_counter()
    for case in cases:
        path.write_bytes(case)
        try:
            load_recipe(path, root=REPO)
        except RecipeError as exc:
            assert all(len(p) < 2000 for p in exc.problems)
    assert time.perf_counter() - start < 60


def test_yaml_errors_are_yaml_errors():
    assert issubclass(BoundedYAMLError, yaml.MarkedYAMLError)


def test_fuzzed_paths_are_refused_or_confined(tmp_path):
    """Random hostile paths in every path field: a RecipeError naming the field, or a path that really is inside."""
    from hubforge.recipe import confine, resolve

    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "ok.jsonl").write_text("{}\n")
    (root / "up").symlink_to("..")
    rng = random.Random(16)
    parts = ["..", ".", "", "data", "ok.jsonl", "up", "/etc", "~", "\x00", "a" * 256, "ش" * 130, "%2e%2e", "\\..",
             "\udcff", " ", "\n", "passwd"]
    for _ in range(300):
        value = "/".join(rng.choice(parts) for _ in range(rng.randint(1, 6)))
        field = rng.choice(["files", "include_path", "model"])
        raw = {"name": "fuzz", "base": {"model": "./" + value if field == "model" else "embedded:gemma-3-270m"},
               "data": {"format": "text", "files": [value if field == "files" else "data/ok.jsonl"]},
               "method": {"name": "lora"}, "eval": {"lm_eval": {"include_path": value if field == "include_path" else None}}}
        try:
            resolve(raw, root=root, source="<fuzz>")
        except RecipeError as exc:
            assert any(f in p for p in exc.problems for f in ("data.files", "include_path", "base.model")), exc.problems
            continue
        confine(root, "./" + value if field == "model" else value)  # accepted means inside: confine agrees
