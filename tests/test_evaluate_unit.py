"""The evaluate stage's checks and pure helpers, without models: bad input -> errors naming the recipe field,
local lm-eval task folders rendered with absolute data paths, the summary rows the card reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hubforge import lmeval
from hubforge.pipeline import StageError
from hubforge.recipe import RecipeError, resolve
from hubforge.rundir import RunDir
from hubforge.stages import evaluate

pytestmark = pytest.mark.unit


def recipe_for(tmp_path: Path, fmt: str = "squad", **eval_section):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "d.jsonl").write_text("{}\n", "utf-8")
    raw = {"name": "unit-eval", "base": {"model": "./base"}, "data": {"files": ["data/d.jsonl"], "format": fmt},
           "method": {"name": "lora"}, "eval": eval_section}
    return resolve(raw, root=tmp_path, source="<test>")


def run_dir_with_rows(tmp_path: Path, rows: list[dict]) -> RunDir:
    run_dir = RunDir.open(tmp_path / "run")
    (run_dir.stage_dir("data") / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return run_dir


# ---------------------------------------------------------------- bad input
def test_zero_eval_rows_names_the_fields(tmp_path):
    run_dir = run_dir_with_rows(tmp_path, [])
    with pytest.raises(StageError, match=r"zero rows.*data\.eval_split.*data\.eval_fraction"):
        evaluate.read_eval_rows(run_dir)


def test_missing_eval_file_points_to_the_data_stage(tmp_path):
    with pytest.raises(StageError, match="data stage"):
        evaluate.read_eval_rows(RunDir.open(tmp_path / "run"))


def test_qa_on_non_squad_data_is_refused_by_the_recipe_and_by_the_stage(tmp_path):
    with pytest.raises(RecipeError, match=r"eval\.qa: QA metrics"):
        recipe_for(tmp_path, fmt="messages", qa=True)
    recipe = recipe_for(tmp_path, qa=True)
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]  # no "qa"
    with pytest.raises(StageError, match=r"eval\.qa needs SQuAD-style rows.*1 of 1"):
        evaluate.check_qa_rows(recipe, rows)


def test_prediction_reference_count_mismatch_names_eval_qa(tmp_path):
    recipe = recipe_for(tmp_path, qa=True)
    rows = [{"qa": {"id": "a", "answers": {"text": ["x"]}}}, {"qa": {"id": "b", "answers": {"text": []}}}]
    with pytest.raises(StageError, match=r"eval\.qa: 1 predictions for 2 references"):
        evaluate.qa_section({"base": ["x"]}, rows, {}, recipe, {})


def test_missing_train_output_is_an_error(tmp_path):
    recipe = recipe_for(tmp_path)
    with pytest.raises(StageError, match="train stage"):
        evaluate.model_plan(recipe, RunDir.open(tmp_path / "run"), tmp_path / "base")


def test_missing_include_path_names_the_field(tmp_path):
    (tmp_path / "nope").mkdir()  # validation checks it exists; it vanished before the stage ran
    recipe = recipe_for(tmp_path, lm_eval={"tasks": ["x"], "include_path": "nope"})
    (tmp_path / "nope").rmdir()
    with pytest.raises(StageError, match=r"eval\.lm_eval\.include_path 'nope'"):
        evaluate.prepare_lm_eval(recipe, tmp_path / "rendered")


# ---------------------------------------------------------------- model plan
def test_model_plan_prefers_the_merged_model(tmp_path):
    recipe = recipe_for(tmp_path)
    run_dir = RunDir.open(tmp_path / "run")
    (run_dir.stage_dir("train") / "adapter").mkdir()
    run_dir.mark("train", status="done", result={"adapter_dir": "train/adapter"})
    models, tuned = evaluate.model_plan(recipe, run_dir, tmp_path / "base")
    assert tuned == "adapter" and models["adapter"]["over"] == "base" and models["base"]["id"] == "./base"
    (run_dir.stage_dir("merge") / "model").mkdir()
    (run_dir.path / "merge" / "model" / "config.json").write_text("{}")
    (run_dir.path / "merge" / "model" / "model.safetensors").write_bytes(b"weights")
    run_dir.mark("merge", status="done", result={"model_dir": "merge/model"})
    models, tuned = evaluate.model_plan(recipe, run_dir, tmp_path / "base")
    assert tuned == "merged" and models["merged"]["sha256"] is not None


# ---------------------------------------------------------------- local lm-eval task folders
def test_render_include_path_makes_data_files_absolute(tmp_path):
    src = tmp_path / "tasks"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.yaml").write_text(
        "task: a\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: ../rows.jsonl\n    train: [x.jsonl, /abs/y.jsonl]\n"
        "process_results: !function utils.process\n", "utf-8")
    (src / "b.yaml").write_text("task: b\ndataset_path: some/hub-dataset\n# untouched\n", "utf-8")
    (src / "utils.py").write_text("def process(doc, results): return {}\n", "utf-8")
    out = lmeval.render_include_path(src, tmp_path / "rendered")
    text = (out / "sub" / "a.yaml").read_text("utf-8")
    assert f"test: {(src / 'rows.jsonl').resolve()}" in text
    assert str((src / "sub" / "x.jsonl").resolve()) in text and "- /abs/y.jsonl" in text
    assert "!function 'utils.process'" in text or "!function utils.process" in text
    assert (out / "b.yaml").read_text("utf-8") == (src / "b.yaml").read_text("utf-8")  # no data_files: copied verbatim
    assert (out / "utils.py").is_file()


def test_absolute_data_files_forms(tmp_path):
    for files, expect in [("d.jsonl", str((tmp_path / "d.jsonl").resolve())),
                          ("hf://datasets/x/y.jsonl", "hf://datasets/x/y.jsonl"), ("/abs.jsonl", "/abs.jsonl")]:
        config = {"dataset_kwargs": {"data_files": files}}
        lmeval.absolute_data_files(config, tmp_path)
        assert config["dataset_kwargs"]["data_files"] == expect
    assert lmeval.absolute_data_files({"dataset_path": "hellaswag"}, tmp_path) is False


def test_offline_sets_and_restores_the_flags(monkeypatch):
    import datasets.config
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = constants.HF_HUB_OFFLINE
    with lmeval.offline():
        import os

        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert constants.HF_HUB_OFFLINE == before and "HF_HUB_OFFLINE" not in __import__("os").environ


# ---------------------------------------------------------------- summary rows and sections
def test_summary_rows_pair_base_and_tuned():
    results = {
        "tuned": "merged",
        "perplexity": {"status": "done", "split": "eval", "n": 4,
                       "results": {"base": {"loss": 3.0, "perplexity": 20.0}, "merged": {"loss": 2.5, "perplexity": 12.2}}},
        "qa": {"status": "skipped"},
        "lm_eval": {"tasks": {
            "t1": {"split": "test", "n": 10, "shots": 5, "higher_is_better": {"acc": True},
                   "results": {"base": {"status": "done", "metrics": {"acc,none": 0.2, "acc_stderr,none": 0.1, "em,strict": 1.0}},
                               "merged": {"status": "done", "metrics": {"acc,none": 0.5, "acc_stderr,none": 0.1, "em,strict": 0.0}}}},
            "t2": {"split": "test", "n": 10, "shots": 0, "higher_is_better": {},
                   "results": {"base": {"status": "failed", "error": "x", "metrics": {}}, "merged": {"status": "done", "metrics": {"acc,none": 1.0}}}},
        }},
    }
    rows = {(r["task"], r["metric"]): r for r in evaluate.summary_rows(results)}
    assert set(rows) == {("heldout_loss", "loss"), ("heldout_loss", "perplexity"), ("t1", "acc"), ("t1", "em (strict)")}
    assert rows[("heldout_loss", "loss")]["delta"] == pytest.approx(-0.5) and not rows[("heldout_loss", "loss")]["higher_is_better"]
    assert rows[("t1", "acc")]["delta"] == pytest.approx(0.3) and rows[("t1", "acc")]["shots"] == 5
    assert all(r["tuned_model"] == "merged" for r in rows.values())


def test_gguf_quality_is_collected_when_the_gguf_stage_is_done(tmp_path):
    run_dir = RunDir.open(tmp_path / "run")
    assert evaluate.gguf_section(run_dir)["status"] == "skipped"
    files = [{"file": "gguf/x-Q4_K_M.gguf", "type": "Q4_K_M", "perplexity": 12.0}]
    run_dir.mark("gguf", status="done", result={"files": files})
    assert evaluate.gguf_section(run_dir) == {"status": "done", "task": "gguf_quality", "files": files}


def test_split_name_says_how_rows_were_held_out(tmp_path):
    assert evaluate.split_name(recipe_for(tmp_path)) == "0.1 of train held out with seed 42"
