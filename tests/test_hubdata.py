"""hubforge.hubdata's tokens per row are what the data stage's own code counts on the shipped stand-in samples: the
embedded Gemma 3 tokenizer, each shipped recipe's formatting and chat template (needs the embedded base, hence slow).

    PYTHONPATH=src .venv/bin/python -m pytest -q tests/test_hubdata.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from hubforge import hubdata, standin

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_token_table_equals_a_fresh_measurement_for_every_shipped_recipe():
    measured = hubdata.measure_shipped(REPO)
    assert set(measured) == set(standin.SAMPLES) == set(hubdata.TOKENS) == set(hubdata.ROWS)
    for hub, found in measured.items():
        for path, lengths in found:
            assert lengths == hubdata.TOKENS[hub], (
                f"{path.name}: hubforge.hubdata.TOKENS[{hub!r}] is stale; measured {lengths} "
                "(regenerate with `PYTHONPATH=src python -m hubforge.hubdata`)")
