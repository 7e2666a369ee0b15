"""Evaluate stage: base vs tuned on the held-out rows, with every number's configuration beside it.

    hubforge run recipes/gemma-3-270m/persian-chat-lora.yaml --stages evaluate

Writes `evaluate/results.json` (schema: hubforge/schema/eval-results.schema.json, read by the card stage),
`evaluate/lm_eval/<model>.json` (lm-eval's own results) and `evaluate/lm_eval/tasks/` (the local task YAMLs as
lm-eval read them, data paths made absolute). Models: `base`; the tuned `adapter` (PEFT over the base) or
`full` checkpoint; `merged` when the merge stage is done. Loss/perplexity is measured on all of them; QA, samples
and lm-eval compare `base` with one tuned model (`merged` when present: it is what is published and quantised).

Same for every model: rows (the first eval.max_samples of data/eval.jsonl), chat template and tokenisation (the
train stage's, via hubforge.chat), tokens scored (assistant turns only when train.assistant_only_loss, as in
training), greedy decoding with the base's stop tokens, batch size, dtype and seed.
"""
from __future__ import annotations

import gc
import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

from hubforge import chat, lmeval, qa_metrics
from hubforge.errors import StageError
from hubforge.models import resolve_base
from hubforge.rundir import now, sha256_file
from hubforge.scoring import (encode_for_loss, heldout_loss, prompt_ids, read_jsonl, scoring_template, split_name,
                              stop_ids)


# The recipe sections this stage reads (part of its cache key; tests/test_layers.py checks it reads no other).
SECTIONS = ('base', 'method', 'data', 'eval', 'train')


def run(recipe, run_dir) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    ev, out = recipe.eval, run_dir.stage_dir("evaluate")
    set_seed(recipe.train.seed)
    (out / "results.json").unlink(missing_ok=True)  # a failed re-run must not leave the previous numbers behind
    shutil.rmtree(out / "lm_eval", ignore_errors=True)

    # ---- inputs, checked before any model is loaded
    rows_all = read_eval_rows(run_dir)
    rows = rows_all[: ev.max_samples]
    qa_rows = check_qa_rows(recipe, rows) if ev.qa else []
    base_dir = resolve_base(recipe)
    models, tuned = model_plan(recipe, run_dir, base_dir)
    tasks = prepare_lm_eval(recipe, out / "lm_eval" / "tasks") if ev.lm_eval.tasks else None

    # ---- one tokenizer and template for every model: the train stage's (hubforge.chat)
    tokenizer, template = chat.load_tokenizer(base_dir, recipe.base.chat_template, need_template=recipe.data.format != "text")
    encoded, tokens_scored = [], "all"
    if ev.perplexity:
        train_template, tokens_scored = scoring_template(tokenizer, recipe)
        encoded = [encode_for_loss(tokenizer, chat.for_template(r, template), train_template, recipe.train.max_length)
                   for r in rows]
    qa_prompts = [prompt_ids(tokenizer, chat.for_template({"messages": r["messages"][:-1]}, template)["messages"])
                  for r in qa_rows]
    sample_prompts = [prompt_ids(tokenizer, chat.for_template({"messages": sample_messages(p, recipe)}, template)["messages"])
                      if template.text else tokenizer(p)["input_ids"] for p in ev.prompts]
    decoding = {"strategy": "greedy", "do_sample": False, "max_new_tokens": ev.max_new_tokens,
                "eos_token_ids": stop_ids(base_dir, extra=(tokenizer.eos_token_id,)), "batch_size": ev.batch_size,
                "padding": "left"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"

    # ---- each model in turn: load, measure, free
    loss, answers, samples, lm_raw, lm_results = {}, {}, {}, {}, {}
    for key, spec in models.items():
        print(f"[evaluate] {key}: {spec['path']}")
        model = load_model(spec, run_dir, base_dir, getattr(torch, dtype), device)
        if ev.perplexity:
            loss[key] = heldout_loss(model, encoded, tokenizer.pad_token_id, ev.batch_size, tqdm, key)
        if key in ("base", tuned):
            answers[key] = generate(model, tokenizer, qa_prompts, decoding, tqdm, f"{key} qa")
            samples[key] = generate(model, tokenizer, sample_prompts, decoding, tqdm, f"{key} samples")
            if tasks:
                lm_raw[key], lm_results[key] = lmeval.run_tasks(model, tokenizer, tasks, recipe, key)
        del model
        gc.collect()

    # ---- assemble, validate, write
    data = run_dir.result("data")
    common = {"data_fingerprint": data.get("fingerprint"), "seed": recipe.train.seed}
    results = {
        "schema_version": 1, "created_at": now(),
        "command": f"hubforge run {recipe.source} --stages evaluate --run-dir {run_dir.path}",
        "recipe": {"source": recipe.source, "sha256": recipe.sha256, "eval": recipe.to_dict()["eval"]},
        "seed": recipe.train.seed,
        "data": {"file": "data/eval.jsonl", "sha256": sha256_file(run_dir.path / "data" / "eval.jsonl"),
                 "fingerprint": data.get("fingerprint"), "rows": len(rows_all), "used": len(rows),
                 "split": split_name(recipe), "format": recipe.data.format, "source": data.get("source")},
        "template": {"source": template.source, "family": template.family, "system_prompt": recipe.data.system_prompt,
                     "sha256": hashlib.sha256(template.text.encode()).hexdigest() if template.text else None},
        "models": models, "tuned": tuned,
        "compute": {"device": device, "dtype": dtype, "batch_size": ev.batch_size},
        "perplexity": perplexity_section(loss, len(rows), tokens_scored, recipe, common),
        "qa": qa_section(answers, qa_rows, decoding, recipe, common),
        "samples": samples_section(samples, ev.prompts, decoding, common),
        "lm_eval": lmeval.section(lm_results, lm_raw, recipe, tasks["offline"] if tasks else False, out, common),
        "gguf": gguf_section(run_dir),
    }
    results["summary"] = summary_rows(results)
    validate(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), "utf-8")
    return {"results": "evaluate/results.json", "tuned": tuned, "models": list(models),
            "sections": {s: results[s]["status"] for s in ("perplexity", "qa", "samples", "lm_eval", "gguf")},
            "summary": results["summary"]}


# ---------------------------------------------------------------- inputs and checks
def read_eval_rows(run_dir) -> list[dict]:
    path = run_dir.path / "data" / "eval.jsonl"
    if not path.is_file():
        raise StageError(f"{path} is missing: the evaluate stage needs the data stage's output; run with --stages data,...")
    rows = read_jsonl(path)
    if not rows:
        raise StageError(f"the eval split has zero rows ({path}): set data.eval_split to a split with rows, or raise "
                         "data.eval_fraction so that some rows are held out")
    return rows


def check_qa_rows(recipe, rows: list[dict]) -> list[dict]:
    missing = sum(1 for r in rows if "qa" not in r or "messages" not in r)
    if recipe.data.format != "squad" or missing:
        raise StageError(f"eval.qa needs SQuAD-style rows (data.format: squad), but data.format is "
                         f"{recipe.data.format!r} and {missing} of {len(rows)} eval rows carry no question/answers; "
                         "set eval.qa: false or use squad data")
    return rows


def model_plan(recipe, run_dir, base_dir: Path) -> tuple[dict, str]:
    """{key: identity} of the models to evaluate, and the key of the tuned model compared in QA/samples/lm-eval."""
    train = run_dir.result("train")
    m = recipe.method
    tuned_dir = train.get("adapter_dir" if m.is_adapter else "model_dir") or ("train/adapter" if m.is_adapter else "train/model")
    if not (run_dir.path / tuned_dir).is_dir():
        raise StageError(f"{run_dir.path / tuned_dir} is missing: the evaluate stage needs the train stage's output")
    models = {"base": {"kind": "base", "id": recipe.base.model, "revision": recipe.base.revision, "path": str(base_dir), "sha256": None}}
    kind = "adapter" if m.is_adapter else "full"
    models[kind] = {"kind": kind, "path": tuned_dir, "sha256": weights_sha256(run_dir.path / tuned_dir)}
    if kind == "adapter":
        models[kind].update(over="base", note="applied over the base in the evaluation dtype"
                            + (" (not 4-bit quantised as in training)" if m.name == "qlora" else ""))
    merged = run_dir.result("merge").get("model_dir") or "merge/model"
    if run_dir.stage("merge").get("status") == "done" and (run_dir.path / merged / "config.json").is_file():
        models["merged"] = {"kind": "merged", "path": merged, "sha256": weights_sha256(run_dir.path / merged)}
    return models, "merged" if "merged" in models else kind


def weights_sha256(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    return hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def prepare_lm_eval(recipe, rendered: Path) -> dict:
    """Check every task name before any model is loaded; render the local task folder with absolute data paths
    into the run dir (kept: it is the task configuration that produced the numbers)."""
    cfg = recipe.eval.lm_eval
    include = None
    if cfg.include_path:
        source = recipe.local_path(cfg.include_path)
        if not source.is_dir():
            raise StageError(f"eval.lm_eval.include_path {cfg.include_path!r}: {source} is not a folder of task YAMLs")
        include = lmeval.render_include_path(source, rendered)
    manager = lmeval.task_manager(list(cfg.tasks), include)
    if unknown := lmeval.unknown_tasks(manager, list(cfg.tasks)):
        hints = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(map(repr, c))}?)" if c else "") for t, c in unknown.items())
        raise StageError(f"eval.lm_eval.tasks: lm-eval does not know {hints}. Use a task name from `lm-eval ls tasks` "
                         "or a task defined in eval.lm_eval.include_path")
    local = all(lmeval.is_local(manager, t, include) for t in cfg.tasks)
    return {"manager": manager, "include": include, "offline": local}


# ---------------------------------------------------------------- prompts
def sample_messages(prompt: str, recipe) -> list[dict]:
    system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []
    return system + [{"role": "user", "content": prompt}]


# ---------------------------------------------------------------- models and measurements
def load_model(spec: dict, run_dir, base_dir: Path, dtype, device: str):
    from transformers import AutoModelForCausalLM

    path = base_dir if spec["kind"] in ("base", "adapter") else run_dir.path / spec["path"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if spec["kind"] == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run_dir.path / spec["path"])
    return model.to(device).eval()


def generate(model, tokenizer, prompts: list[list[int]], decoding: dict, tqdm, desc: str) -> list[str]:
    import torch

    device, pad, texts = next(model.parameters()).device, tokenizer.pad_token_id, {}
    size = decoding["batch_size"]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    for start in tqdm(range(0, len(prompts), size), desc=f"[evaluate] {desc}", disable=not prompts):
        indices = order[start:start + size]
        batch = [prompts[i] for i in indices]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=decoding["max_new_tokens"],
                                 eos_token_id=decoding["eos_token_ids"], pad_token_id=pad, top_p=None, top_k=None, temperature=None)
        texts.update({i: tokenizer.decode(row[width:], skip_special_tokens=True).strip() for i, row in zip(indices, out)})
    if len(texts) != len(prompts):
        raise StageError(f"{len(texts)} generations for {len(prompts)} prompts ({desc}); check eval.batch_size")
    return [texts[i] for i in range(len(prompts))]


# ---------------------------------------------------------------- results.json sections (pure)
def skipped(reason: str, common: dict) -> dict:
    return {"status": "skipped", "reason": reason, **common}


def perplexity_section(loss: dict, n: int, tokens_scored: str, recipe, common: dict) -> dict:
    if not recipe.eval.perplexity:
        return skipped("eval.perplexity is false", common)
    return {"status": "done", "task": "heldout_loss", "split": split_name(recipe), "n": n, "shots": 0, "decoding": None,
            **common, "models": list(loss), "tokens_scored": tokens_scored, "max_length": recipe.train.max_length,
            "config": {"eval.max_samples": recipe.eval.max_samples, "eval.batch_size": recipe.eval.batch_size,
                       "train.max_length": recipe.train.max_length, "train.assistant_only_loss": recipe.train.assistant_only_loss},
            "results": {k: {**v, "loss": round(v["loss"], 6), "perplexity": round(v["perplexity"], 4)} for k, v in loss.items()}}


def qa_section(answers: dict, qa_rows: list[dict], decoding: dict, recipe, common: dict) -> dict:
    if not recipe.eval.qa:
        return skipped("eval.qa is false", common)
    references = [r["qa"]["answers"]["text"] for r in qa_rows]
    try:
        scores = {k: qa_metrics.squad_v2_scores(v, references, recipe.data.no_answer_text) for k, v in answers.items()}
    except ValueError as exc:
        raise StageError(f"eval.qa: {exc}") from None
    return {"status": "done", "task": "squad_v2", "split": split_name(recipe), "n": len(qa_rows), "shots": 0,
            "decoding": decoding, **common, "models": list(answers),
            "n_answerable": sum(1 for r in references if r), "n_unanswerable": sum(1 for r in references if not r),
            "normalization": {"name": qa_metrics.NORMALIZATION_NAME, "no_answer_text": recipe.data.no_answer_text,
                              "description": "official SQuAD v2 for English; Persian/Arabic letter, digit, diacritic, "
                                             "ZWNJ and punctuation unification for Arabic script (hubforge.qa_metrics)"},
            "config": {"eval.qa": True, "eval.max_samples": recipe.eval.max_samples, "eval.max_new_tokens": recipe.eval.max_new_tokens,
                       "data.no_answer_text": recipe.data.no_answer_text, "prompt": "the row's training prompt (chat template, generation prompt)"},
            "results": scores,
            "predictions": [{"id": r["qa"]["id"], "answers": ref, "outputs": {k: v[i] for k, v in answers.items()}}
                            for i, (r, ref) in enumerate(zip(qa_rows, references))]}


def samples_section(samples: dict, prompts: tuple, decoding: dict, common: dict) -> dict:
    if not prompts:
        return skipped("no eval.prompts (nor space.examples)", common)
    return {"status": "done", "task": "samples", "n": len(prompts), "shots": 0, "decoding": decoding, **common,
            "models": list(samples), "config": {"eval.prompts": list(prompts)},
            "items": [{"prompt": p, "outputs": {k: v[i] for k, v in samples.items()}} for i, p in enumerate(prompts)]}


def gguf_section(run_dir) -> dict:
    if run_dir.stage("gguf").get("status") != "done":
        return {"status": "skipped", "reason": "the gguf stage has not run before this one; the card reads its result"}
    return {"status": "done", "task": "gguf_quality", "files": run_dir.result("gguf").get("files", [])}


def summary_rows(results: dict) -> list[dict]:
    tuned, rows = results["tuned"], []

    def add(section, task, metric, split, n, shots, base, new, better):
        delta = new - base if isinstance(base, (int, float)) and isinstance(new, (int, float)) else None
        rows.append({"section": section, "task": task, "metric": metric, "split": split, "n": n, "shots": shots,
                     "base": base, "tuned": new, "delta": delta, "tuned_model": tuned, "higher_is_better": better})

    ppl = results["perplexity"]
    if ppl["status"] == "done" and tuned in ppl["results"]:
        for metric in ("loss", "perplexity"):
            add("perplexity", "heldout_loss", metric, ppl["split"], ppl["n"], 0,
                ppl["results"]["base"][metric], ppl["results"][tuned][metric], False)
    qa = results["qa"]
    if qa["status"] == "done":
        for part in ("overall", "answerable", "unanswerable"):
            for metric in ("exact_match", "f1"):
                name = metric if part == "overall" else f"{metric}_{part}"
                add("qa", "squad_v2", name, qa["split"], qa["results"]["base"][part]["n"], 0,
                    qa["results"]["base"][part][metric], qa["results"][tuned][part][metric], True)
    for task, entry in results["lm_eval"].get("tasks", {}).items():
        base, new = entry["results"].get("base", {}), entry["results"].get(tuned, {})
        if base.get("status") != "done" or new.get("status") != "done":
            continue
        for key, value in base["metrics"].items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            add("lm_eval", task, metric if filt == "none" else f"{metric} ({filt})", entry["split"], entry["n"],
                entry["shots"] or 0, value, new["metrics"].get(key), bool(entry["higher_is_better"].get(metric, True)))
    return rows


def validate(results: dict) -> None:
    import jsonschema

    schema = json.loads(resources.files("hubforge").joinpath("schema/eval-results.schema.json").read_text("utf-8"))
    jsonschema.validate(results, schema)
