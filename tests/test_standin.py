"""`--unset` and `--standin` resolution (issue #15): every shipped recipe resolves as a stand-in run on the embedded
base and a shipped sample of its data format, the changes are recorded, and a stand-in is never published.

    pytest -m unit tests/test_standin.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hubforge import formats, pipeline, standin
from hubforge.errors import StageError
from hubforge.recipe import RecipeError, dump_resolved, find_recipes, load_recipe, read_resolved

REPO = Path(__file__).resolve().parents[1]
RECIPES = find_recipes([REPO / "recipes"])
QA = REPO / "recipes/llama-3.1-8b/persian-qa-qlora.yaml"
DOLLY = REPO / "recipes/gemma-3-270m/dolly-lora.yaml"


@pytest.mark.unit
def test_unset_removes_a_key_so_hub_data_can_become_local_files():
    with pytest.raises(RecipeError, match="exactly one of data.hub"):
        load_recipe(QA, ["data.files=[recipes/data/standin/persian-qa.jsonl]"])
    recipe = load_recipe(QA, ["data.files=[recipes/data/standin/persian-qa.jsonl]"],
                         unset=["data.hub", "data.revision", "data.eval_split"])
    assert recipe.data.hub is None and recipe.data.files == ("recipes/data/standin/persian-qa.jsonl",)
    assert recipe.data.revision is None and recipe.data.eval_split is None  # back to the schema defaults
    assert load_recipe(QA, unset=["train.weight_decay"]).train.weight_decay == 0.0  # default again, not the YAML's 0.01


@pytest.mark.unit
@pytest.mark.parametrize("unset, message", [(["data.nope"], "has no such key"), (["nope.hub"], "has no such key"),
                                            (["train.seed"], "also given to --set")])
def test_unset_errors_name_the_key(unset, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(QA, ["train.seed=1"], unset=unset)


@pytest.mark.unit
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_resolves_as_a_standin_of_its_own_method_and_format(path):
    real, stand = load_recipe(path), load_recipe(path, standin=True)
    assert stand.base.model == "embedded:gemma-3-270m" and stand.base.revision is None
    assert stand.data.hub is None and stand.data.files and stand.data.format == real.data.format
    # the recipe's own code paths: method and its settings, quantization, template, data handling, eval kind
    assert (stand.method, stand.base.chat_template, stand.data.system_prompt, stand.data.fraction, stand.train.packing,
            stand.eval.qa) == (real.method, real.base.chat_template, real.data.system_prompt, real.data.fraction,
                               real.train.packing, real.eval.qa)
    assert stand.train.max_steps == 2 and stand.eval.max_samples <= 4 and stand.train.max_length <= 256
    assert stand.export.gguf.quants == ("Q8_0",) and stand.export.gguf.outtype == "F16"
    assert stand.standin and real.standin is None and stand.sha256 != real.sha256
    # the sample has the columns the recipe maps
    sample = [json.loads(line) for line in stand.local_path(stand.data.files[0]).read_text("utf-8").splitlines()]
    mapping = formats.column_map(stand.data.format, dict(stand.data.columns))
    assert formats.check_columns(stand.data.format, mapping, list(sample[0])) is None
    assert len(sample) >= 30


@pytest.mark.unit
def test_standin_is_recorded_in_the_resolved_recipe_and_survives_a_round_trip(tmp_path):
    recipe = load_recipe(QA, ["train.seed=7"], standin=True)
    saved = yaml.safe_load(dump_resolved(recipe))
    assert "--set base.model=embedded:gemma-3-270m" in saved["standin"]
    assert "--unset data.hub" in saved["standin"] and saved["train"]["seed"] == 7  # the user's --set comes after
    (tmp_path / "recipe.resolved.yaml").write_text(dump_resolved(recipe), "utf-8")
    assert read_resolved(tmp_path / "recipe.resolved.yaml").standin == recipe.standin
    assert "standin" not in load_recipe(QA).to_dict()  # absent from ordinary runs: their hashes do not change


@pytest.mark.unit
def test_squad_sample_has_unanswerable_rows_and_answers_at_their_offsets():
    rows = [json.loads(line) for line in (REPO / "recipes/data/standin/persian-qa.jsonl").read_text("utf-8").splitlines()]
    unanswerable = [r for r in rows if not r["answers"]["text"]]
    assert 0 < len(unanswerable) < len(rows)
    for r in rows:
        for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert r["context"][start:start + len(text)] == text


@pytest.mark.unit
def test_lm_eval_tasks_map_to_local_standin_tasks():
    recipe = load_recipe(DOLLY, standin=True)
    assert recipe.eval.lm_eval.tasks == ("standin_mmlu", "standin_hellaswag")
    folder = recipe.local_path(recipe.eval.lm_eval.include_path)
    assert {p.stem for p in folder.glob("*.yaml")} >= set(recipe.eval.lm_eval.tasks)
    assert load_recipe(DOLLY, ["eval.lm_eval.tasks=[mmlu_anatomy, hellaswag]"], standin=False).eval.lm_eval.tasks
    sets, _ = standin.overrides({"data": {"hub": "x/y", "format": "messages"}, "eval": {"lm_eval": {"tasks": ["mmlu_anatomy"]}}})
    assert 'eval.lm_eval.tasks=["standin_mmlu"]' in sets
    with pytest.raises(standin.StandinError, match="no stand-in task for arc_easy"):
        standin.overrides({"data": {"hub": "x/y", "format": "messages"}, "eval": {"lm_eval": {"tasks": ["arc_easy"]}}})


@pytest.mark.unit
def test_a_standin_is_never_published():
    recipe = load_recipe(DOLLY, standin=True)
    with pytest.raises(StageError, match="never published"):
        pipeline.preflight(recipe, pipeline.select_stages(None, publish=True))
    pipeline.preflight(recipe, pipeline.select_stages(None))  # without publishing it runs


@pytest.mark.unit
def test_cli_refuses_standin_with_publish_or_remote():
    from typer.testing import CliRunner

    from hubforge.cli import app

    for extra in (["--publish"], ["--remote", "hf-jobs"], ["--publish", "--dry-run"]):
        result = CliRunner().invoke(app, ["run", str(DOLLY), "--standin", *extra])
        assert result.exit_code == 1 and "never published" in result.output, result.output
