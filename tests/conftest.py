"""Shared test fixtures: a tiny random Gemma 3 with a real SentencePiece tokenizer, the shipped Persian data,
and a recipe factory whose local paths resolve inside a temporary project root.

Tiers are pytest markers (see pyproject.toml); `make test` runs every tier that can run on this machine.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

# Tests never reach the real Hub: keep library telemetry and version checks quiet and local.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# llama.cpp next to torch in one process: spin-waiting OpenMP threads make generation up to 500x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Gemma 3 text model (hidden 256, 2 layers, 1k SentencePiece vocab) saved as an HF checkpoint."""
    from tiny_model import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def persian_chat_file() -> Path:
    return REPO / "recipes" / "data" / "persian-chat.jsonl"


MINIMAL_RECIPE = {
    "name": "tiny-test",
    "base": {"model": "./base"},
    "data": {"files": ["data/chat.jsonl"], "format": "messages"},
    "method": {"name": "lora"},
    "train": {"max_steps": 2, "batch_size": 2, "max_length": 128, "save_steps": 1},
    "eval": {"max_samples": 4},
    "card": {"languages": ["fa"], "description": "test"},
}


def _merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


@pytest.fixture(scope="session")
def recipe_at():
    """recipe_at(root, **sections) -> a resolved Recipe rooted at `root` (sections deep-merged over MINIMAL_RECIPE);
    for module-scoped fixtures that lay out their own project folder."""
    from hubforge.recipe import resolve

    def factory(root, source: str = "<test>", **sections):
        return resolve(_merge(copy.deepcopy(MINIMAL_RECIPE), sections), root=root, source=source)

    return factory


@pytest.fixture
def make_recipe(tmp_path, tiny_base, persian_chat_file):
    """make_recipe(method={"name": "qlora"}, ...) -> a resolved Recipe rooted at tmp_path, with ./base = tiny_base
    and data/chat.jsonl = the shipped Persian chat data (sections are deep-merged over MINIMAL_RECIPE)."""
    from hubforge.recipe import resolve

    root = tmp_path / "project"
    (root / "data").mkdir(parents=True, exist_ok=True)
    if not (root / "base").exists():
        shutil.copytree(tiny_base, root / "base")  # a copy, not a symlink: paths must resolve inside the root
    if not (root / "data" / "chat.jsonl").exists():
        (root / "data" / "chat.jsonl").write_bytes(persian_chat_file.read_bytes())

    def factory(**sections):
        raw = _merge(copy.deepcopy(MINIMAL_RECIPE), sections)
        return resolve(raw, root=root, source="<test>")

    return factory
