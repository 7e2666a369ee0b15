"""The evaluate stage end to end on the tiny random Gemma 3: a run dir built here by hand (held-out squad rows, a
randomly perturbed LoRA adapter in train/adapter and its merge in merge/model, manifest entries), then
`evaluate.run` -> evaluate/results.json, checked against its schema and against independent computations.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from hubforge.pipeline import StageError
from hubforge.rundir import RunDir

pytestmark = pytest.mark.integration
FIXTURES = Path(__file__).parent / "fixtures" / "eval"
NO_ANSWER = "پاسخی در متن نیست."
QA = [  # (id, context, question, answers)
    ("fa1", "تهران پایتخت ایران است.", "پایتخت ایران کجاست؟", ["تهران"]),
    ("fa2", "تهران پایتخت ایران است.", "جمعیت پاریس چقدر است؟", []),
    ("en1", "The Nile is a river in Africa.", "Where is the Nile?", ["in Africa", "Africa"]),
    ("fa3", "کتاب‌های او در سال ۱۳۹۹ چاپ شد.", "کتاب‌ها کی چاپ شد؟", ["۱۳۹۹", "سال ۱۳۹۹"]),
    ("en2", "Paris is in France.", "Who won the 1990 World Cup?", []),
    ("fa4", "رنگ آسمان آبی است.", "رنگ آسمان چیست؟", ["آبی"]),
]


def squad_row(qid, context, question, answers) -> dict:
    """A row as the data stage writes it for data.format: squad."""
    return {"messages": [{"role": "user", "content": f"{context}\n\n{question}"},
                         {"role": "assistant", "content": answers[0] if answers else NO_ANSWER}],
            "qa": {"id": qid, "context": context, "question": question,
                   "answers": {"text": answers, "answer_start": [max(context.find(a), 0) for a in answers]}}}


def build_adapter(base: Path, dest: Path, merged: Path | None = None, seed: int = 1) -> None:
    """A LoRA adapter with random (non-zero) B matrices, so tuned differs from base; optionally its merge."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    model.save_pretrained(dest)
    if merged is not None:
        model.merge_and_unload().save_pretrained(merged)


@pytest.fixture
def qa_run(tmp_path, make_recipe, tiny_base):
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "squad.jsonl").write_text("".join(json.dumps({"id": q, "context": c, "question": qq, "answers": {"text": a}},
                                                                  ensure_ascii=False) + "\n" for q, c, qq, a in QA), "utf-8")
    shutil.copytree(FIXTURES / "lm_tasks", root / "lm_tasks")
    recipe = make_recipe(
        data={"files": ["data/squad.jsonl"], "format": "squad", "no_answer_text": NO_ANSWER},
        method={"name": "lora"}, train={"assistant_only_loss": True, "max_length": 96},
        eval={"qa": True, "max_samples": 5, "batch_size": 2, "max_new_tokens": 6, "prompts": ["سلام، حالت چطور است؟", "Hello"],
              "lm_eval": {"tasks": ["hubforge_tiny_mc", "hubforge_broken"], "limit": 3, "include_path": "lm_tasks"}},
    )
    run_dir = RunDir.open(tmp_path / "run")
    rows = [squad_row(*q) for q in QA]
    (run_dir.stage_dir("data") / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    run_dir.mark("data", status="done", result={"rows_eval": len(rows), "fingerprint": "f" * 64, "format": "squad",
                                                "source": {"files": [{"path": "data/squad.jsonl", "sha256": "0" * 64}]}})
    build_adapter(tiny_base, run_dir.stage_dir("train") / "adapter", merged=run_dir.stage_dir("merge") / "model")
    run_dir.mark("train", status="done", result={"method": "lora", "adapter_dir": "train/adapter"})
    run_dir.mark("merge", status="done", result={"model_dir": "merge/model"})
    return recipe, run_dir, rows


def independent_loss(model_dir: Path, rows: list[dict], tiny_base: Path) -> float:
    """Mean NLL over assistant tokens, one row at a time through the model's own loss (full logits, no batching)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for row in rows:
        user, answer = row["messages"]
        prompt = tokenizer.apply_chat_template([user], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert full[:len(prompt)] == prompt
        # TRL's Gemma 3 training template marks everything after the generation prompt (answer, <end_of_turn>, newline)
        labels = [-100] * len(prompt) + full[len(prompt):]
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels])).loss.item()
        n = sum(1 for x in labels[1:] if x != -100)
        total, count = total + loss * n, count + n
    return total / count


def test_base_vs_tuned_results(qa_run, tiny_base):
    import jsonschema

    from hubforge.qa_metrics import squad_v2_scores
    from hubforge.stages import evaluate

    recipe, run_dir, rows = qa_run
    result = evaluate.run(recipe, run_dir)
    results = json.loads((run_dir.path / "evaluate" / "results.json").read_text("utf-8"))
    schema = json.loads((Path(evaluate.__file__).parents[1] / "schema" / "eval-results.schema.json").read_text("utf-8"))
    jsonschema.validate(results, schema)
    assert result["tuned"] == results["tuned"] == "merged"
    assert set(results["models"]) == {"base", "adapter", "merged"}
    assert results["data"]["rows"] == 6 and results["data"]["used"] == 5 and results["data"]["fingerprint"] == "f" * 64

    # held-out loss: same rows/tokens for all models; merged == adapter; base matches an independent computation
    ppl = results["perplexity"]
    assert ppl["status"] == "done" and ppl["tokens_scored"] == "assistant" and ppl["n"] == 5
    assert len({r["tokens"] for r in ppl["results"].values()}) == 1
    assert ppl["results"]["merged"]["loss"] == pytest.approx(ppl["results"]["adapter"]["loss"], abs=1e-3)
    assert abs(ppl["results"]["merged"]["loss"] - ppl["results"]["base"]["loss"]) > 1e-3
    assert ppl["results"]["base"]["loss"] == pytest.approx(independent_loss(tiny_base, rows[:5], tiny_base), rel=1e-4)
    assert ppl["results"]["merged"]["loss"] == pytest.approx(independent_loss(run_dir.path / "merge" / "model", rows[:5], tiny_base), rel=1e-4)
    assert ppl["results"]["base"]["perplexity"] == pytest.approx(math.exp(ppl["results"]["base"]["loss"]), rel=1e-5)

    # QA: counts from the data, scores recomputable from the stored predictions
    qa = results["qa"]
    assert (qa["n"], qa["n_answerable"], qa["n_unanswerable"]) == (5, 3, 2)
    assert qa["decoding"]["do_sample"] is False and qa["decoding"]["max_new_tokens"] == 6
    refs = [p["answers"] for p in qa["predictions"]]
    for key in ("base", "merged"):
        assert qa["results"][key] == squad_v2_scores([p["outputs"][key] for p in qa["predictions"]], refs, NO_ANSWER)

    # samples: every prompt answered by base and tuned
    assert [i["prompt"] for i in results["samples"]["items"]] == list(recipe.eval.prompts)
    assert all(set(i["outputs"]) == {"base", "merged"} for i in results["samples"]["items"])

    # lm-eval: the local task ran with absolute data paths (offline), the broken one is recorded as failed
    lm = results["lm_eval"]
    assert lm["offline"] is True and lm["status"] == "failed" and "hubforge_broken" in lm["error"]
    mc = lm["tasks"]["hubforge_tiny_mc"]
    assert mc["status"] == "done" and mc["n"] == 3 and mc["shots"] == 0 and mc["split"] == "test"
    assert Path(mc["task_config"]["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    assert 0.0 <= mc["results"]["merged"]["metrics"]["acc,none"] <= 1.0
    broken = lm["tasks"]["hubforge_broken"]
    assert broken["status"] == "failed" and "does_not_exist.jsonl" in broken["results"]["base"]["error"]
    assert (run_dir.path / lm["raw"]["base"]).is_file()

    # the summary rows the card uses are exactly the numbers above
    rows_by = {(r["section"], r["task"], r["metric"]): r for r in results["summary"]}
    assert rows_by[("perplexity", "heldout_loss", "loss")]["tuned"] == ppl["results"]["merged"]["loss"]
    assert rows_by[("qa", "squad_v2", "f1_unanswerable")]["n"] == 2
    assert rows_by[("lm_eval", "hubforge_tiny_mc", "acc")]["base"] == mc["results"]["base"]["metrics"]["acc,none"]
    assert not any(r["task"] == "hubforge_broken" for r in results["summary"])
    assert results["gguf"]["status"] == "skipped"


def test_adapter_is_the_tuned_model_without_merge(qa_run):
    from hubforge.stages import evaluate

    recipe, run_dir, _ = qa_run
    run_dir.mark("merge", status="not_applicable", result={"status": "not_applicable"})
    recipe = replace(recipe, eval=replace(recipe.eval, qa=False, prompts=(), lm_eval=replace(recipe.eval.lm_eval, tasks=())))
    evaluate.run(recipe, run_dir)
    results = json.loads((run_dir.path / "evaluate" / "results.json").read_text("utf-8"))
    assert results["tuned"] == "adapter" and set(results["models"]) == {"base", "adapter"}
    assert results["qa"]["status"] == results["samples"]["status"] == results["lm_eval"]["status"] == "skipped"
    assert [r["metric"] for r in results["summary"]] == ["loss", "perplexity"]


def test_unknown_lm_eval_task_names_the_field(qa_run):
    from hubforge.stages import evaluate

    recipe, run_dir, _ = qa_run
    recipe = replace(recipe, eval=replace(recipe.eval, lm_eval=replace(recipe.eval.lm_eval, tasks=("hubforge_tiny_mcq",))))
    with pytest.raises(StageError, match=r"eval\.lm_eval\.tasks.*'hubforge_tiny_mcq'.*did you mean 'hubforge_tiny_mc'"):
        evaluate.run(recipe, run_dir)
    assert not (run_dir.path / "evaluate" / "results.json").exists()


def test_prompt_tuning_adapter(tmp_path, make_recipe, tiny_base, persian_chat_file):
    """Virtual tokens shift the model's positions: the loss must still score exactly the row's own tokens (from the
    second on, as for the base: predicting <bos> from the virtual tokens alone would flatter the tuned model)."""
    import torch
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubforge.stages import evaluate

    recipe = make_recipe(method={"name": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 4}},
                         train={"assistant_only_loss": False, "max_length": 128},
                         eval={"max_samples": 3, "batch_size": 2, "max_new_tokens": 4, "prompts": ["سلام"]})
    run_dir = RunDir.open(tmp_path / "run")
    rows = [json.loads(line) for line in persian_chat_file.read_text("utf-8").splitlines()[:3]]
    (run_dir.stage_dir("data") / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    run_dir.mark("data", status="done", result={"fingerprint": "p" * 64, "source": None})
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                                PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    peft_model.save_pretrained(run_dir.stage_dir("train") / "adapter")
    run_dir.mark("train", status="done", result={"adapter_dir": "train/adapter"})
    run_dir.mark("merge", status="not_applicable", result={"status": "not_applicable"})

    evaluate.run(recipe, run_dir)
    results = json.loads((run_dir.path / "evaluate" / "results.json").read_text("utf-8"))
    assert results["tuned"] == "adapter" and results["perplexity"]["tokens_scored"] == "all"
    assert set(results["samples"]["items"][0]["outputs"]) == {"base", "adapter"}

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), run_dir.path / "train" / "adapter").eval()
    total, count = 0.0, 0
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"][:128]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, 4:]  # full logits; the first 4 are virtual positions
        total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    assert results["perplexity"]["results"]["adapter"]["loss"] == pytest.approx(total / count, rel=1e-4)
    assert results["perplexity"]["results"]["adapter"]["tokens"] == count
