"""Stand-in runs of the seed recipes, one per method, data → train → merge → evaluate → gguf → card (slow tier).

    pytest -m slow tests/test_standin_runs.py          # ~1-3 minutes per recipe on 2 cores
    make standins                                     # every shipped recipe the same way (not a test)

Each recipe runs unedited through the CLI with `--standin` (embedded Gemma 3 270M, the shipped sample of its data
format, 2 steps, 4 eval rows, GGUF F16 + Q8_0); its cards validate (the card stage checks them against the schema
and parses them back) and show the eval the recipe names: lm-eval tasks (local stand-ins) or EM/F1.
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

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# one per method (README "Stand-in runs"); the rest run under `make standins`
REPRESENTATIVE = {
    "lora": "gemma-3-270m/dolly-lora.yaml",
    "qlora": "llama-3.1-8b/persian-qa-qlora.yaml",
    "prompt_tuning": "gemma-3-270m/dolly-prompt-tuning.yaml",
    "p_tuning": "gemma-2-2b-it/persian-slimorca-p-tuning.yaml",
    "full": "gemma-2-2b-it/persian-slimorca-embed-head-full.yaml",
}
STAGES = ("data", "train", "merge", "evaluate", "gguf", "card")


@pytest.fixture(scope="module", params=sorted(REPRESENTATIVE), ids=str)
def standin_run(request, tmp_path_factory):
    recipe = REPO / "recipes" / REPRESENTATIVE[request.param]
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    proc = subprocess.run([sys.executable, "-m", "hubforge.cli", "run", str(recipe), "--standin", "--quiet",
                           "--run-dir", str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield request.param, recipe, run_dir
    if not os.environ.get("HUBFORGE_KEEP_TEST_RUNS"):  # set it to look at the run afterwards
        shutil.rmtree(run_dir, ignore_errors=True)  # a full fine-tune's run holds ~4 GB; CI's disk holds the session


def test_every_stage_ran_and_the_run_is_marked_a_standin(standin_run):
    method, _recipe, run_dir = standin_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    statuses = {s: manifest["stages"][s]["status"] for s in STAGES}
    from hubforge import products
    from hubforge.recipe import read_resolved

    recipe = read_resolved(run_dir / "recipe.resolved.yaml")
    expected_na = {s for s in STAGES if not products.applies(s, recipe)}
    assert method not in ("lora", "qlora") or not expected_na  # adapters that merge reach GGUF
    assert statuses == {s: "not_applicable" if s in expected_na else "done" for s in STAGES}, statuses
    train = manifest["stages"]["train"]["result"]
    assert train["method"] == method and train["steps"] == 2 and train["tokens_seen"] > 0
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    assert resolved["base"]["model"] == "embedded:gemma-3-270m" and resolved["standin"]
    if method == "qlora":  # bitsandbytes 4-bit on CPU, and Llama 3.1's template through hubforge's training variant
        assert resolved["method"]["quantization"]["quant_type"] == "nf4"
        assert train["chat_template"]["source"] == "trl:llama3_1.jinja" and train["assistant_only_loss"]
        assert train["chat_template"]["training_variant"] == "hubforge:llama3_1_training.jinja"
    if "gguf" not in expected_na:
        files = manifest["stages"]["gguf"]["result"]["files"]
        assert [f["type"] for f in files] == ["F16", "Q8_0"] and all((run_dir / f["file"]).is_file() for f in files)


def test_cards_validate_and_show_the_eval_the_recipe_names(standin_run):
    method, recipe, run_dir = standin_run
    cards = sorted((run_dir / "card").glob("*/README.md"))
    assert cards, "no card rendered"
    text = cards[0].read_text("utf-8")
    assert "license: gemma" in text  # inherited from the (embedded Gemma) base
    real = yaml.safe_load(recipe.read_text())
    if real.get("eval", {}).get("lm_eval", {}).get("tasks"):
        assert "standin_mmlu" in text and "standin_hellaswag" in text
    if real.get("eval", {}).get("qa"):
        assert "unanswerable" in text.lower() and "F1" in text
    if method == "prompt_tuning":
        assert "prompt tuning" in text.lower() and "lora-adapted" not in text.lower()
