"""Golden files: every card kind rendered from fixed fake run directories (tests/fixtures/cards/runs/*: manifest +
evaluate/results.json) must equal the reviewed files in tests/fixtures/cards/goldens/.

A template or metadata change shows up here as a diff to review. Regenerate deliberately, never silently:

    HUBFORGE_UPDATE_GOLDENS=1 .venv/bin/python -m pytest tests/test_card_goldens.py -q -p no:cacheprovider
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hubforge.recipe import load_recipe
from hubforge.rundir import RunDir
from hubforge.stages import card

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cards"
GOLDENS = FIXTURES / "goldens"
UPDATE = os.environ.get("HUBFORGE_UPDATE_GOLDENS") == "1"
CASES = [("persian-chat-lora", "adapter"), ("persian-chat-lora", "merged"), ("persian-chat-lora", "gguf"),
         ("persian-chat-lora", "space"), ("dolly-prompt-tuning", "adapter"), ("dolly-prompt-tuning", "space")]


def fixture_run(name: str, tmp_path: Path):
    recipe = load_recipe(FIXTURES / "recipes" / f"{name}.yaml", root=FIXTURES)
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "runs" / name, run_dir)
    return recipe, RunDir.open(run_dir)


def rendered(name: str, kind: str, tmp_path: Path) -> str:
    recipe, run_dir = fixture_run(name, tmp_path)
    if kind == "space":
        return card.render_space_readme(recipe, run_dir)
    result = card.run(recipe, run_dir)
    return (run_dir.path / result["cards"][kind]).read_text("utf-8")


@pytest.mark.parametrize("name,kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_card_matches_golden(name, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FixtureTokenThatMustNeverAppear123")
    text = rendered(name, kind, tmp_path)
    golden = GOLDENS / name / f"{kind}.md"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, "utf-8")
        pytest.skip(f"rewrote {golden.relative_to(FIXTURES.parents[1])}; review the diff")
    assert golden.is_file(), f"no golden {golden}; create it with HUBFORGE_UPDATE_GOLDENS=1 and review it"
    assert text == golden.read_text("utf-8"), (
        f"{name}/{kind} card differs from {golden}; if the change is intended, regenerate with HUBFORGE_UPDATE_GOLDENS=1")


def test_goldens_hold_no_secrets():
    for path in GOLDENS.rglob("*.md"):
        text = path.read_text("utf-8")
        assert "hf_" not in text.replace("hf.co/", ""), path
        assert "FixtureToken" not in text, path
