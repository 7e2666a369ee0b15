"""`hubforge summary RUN_DIR`: the job summary of a run shows its stages, the eval table and the GGUF quality
table from the same rows the cards use (fixture run directory from the card tests)."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hubforge.cli import app

pytestmark = pytest.mark.unit
RUN = Path(__file__).parent / "fixtures" / "cards" / "runs" / "persian-chat-lora"


def test_summary_shows_stages_eval_and_gguf_quality_tables():
    result = CliRunner().invoke(app, ["summary", str(RUN)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "| train | done |" in out
    assert "| Perplexity ↓ | held-out rows | 0.1 of train held out with seed 3407 | 25 | 86.33 | 31.2 | -55.13 (-63.9%) | better |" in out
    assert "| gemma-3-270m-persian-chat-Q4_K_M.gguf ⚠️ | Q4_K_M | 253.0 MB |" in out  # not recommended, flagged


def test_summary_of_a_folder_that_is_not_a_run_says_so(tmp_path):
    result = CliRunner().invoke(app, ["summary", str(tmp_path)])
    assert result.exit_code == 1 and "has no manifest.json" in result.output
