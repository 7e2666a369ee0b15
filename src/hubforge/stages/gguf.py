"""GGUF stage: the merged model as llama.cpp files (full precision + every quant the recipe lists), each verified.

    hubforge run recipes/gemma-3-270m/persian-chat-lora.yaml --stages gguf

Outputs in `gguf/`: `<name>-<TYPE>.gguf` (export.gguf.outtype, then each of export.gguf.quants, then `AUTO` when
export.gguf.auto finds a mixture that meets its budget), with export.gguf.lora also `<name>-LoRA-F16.gguf`;
`<name>.imatrix` (the importance matrix every quant was made with); `quality.json`: the quality table the GGUF card
shows; `llama.log`: everything llama.cpp printed. A file over export.gguf.split_above also as
`<name>-<TYPE>-0000N-of-0000M.gguf` parts (what the repo gets), and Ollama's `template` and `params`
(hubforge.ollama) when the chat template is one of the families it knows.

1. Preflight: the converter knows the architecture, a LoRA adapter carries only what llama.cpp applies, and the
   disk holds the expected sizes. 2. Convert with llama.cpp's own converter (hubforge.llamacpp). 3. Tokenizer probe:
   HF tokenizer vs the GGUF vocabulary as llama.cpp reads it, on multilingual text, control tokens and whitespace
   runs, plus BOS/EOS ids and the chat template; any difference stops the stage. 4. llama.cpp's reference: the
   full-precision file's log-probabilities on the held-out rows (llama-perplexity). 5. Importance matrix on the
   training split (hubforge.gguf_imatrix; a tied output head included). 6. Quantize every type with it
   (llama-quantize), and once more without it to record what it changed. 7. AUTO: the smallest per-tensor mixture
   whose measured same-top share and perplexity meet the recipe's budget (hubforge.gguf_auto). 8. Measure every
   file: llama.cpp's KL divergence from the full-precision file on the held-out text; and, against the merged HF
   model (float32 compute), greedy agreement, where the full-precision file must agree exactly on every step that
   is not a near-tie, perplexity over the tokens training scored (so the full-precision file's number is the
   card's tuned perplexity), tokens/s. A file whose next-token choice leaves the merged model's on most positions is
   published but marked not recommended. 9. LoRA-GGUF: base f16 GGUF + adapter must give the merged f16's greedy
   text. The terminal gets one line per step; llama.cpp's own output goes to `gguf/llama.log`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import closing
from pathlib import Path

from hubforge import chat, gguf_auto, gguf_imatrix, llamacpp, llamatools, ollama, products
from hubforge.errors import StageError
from hubforge.models import count_params, resolve_base
from hubforge.recipe import confine
from hubforge.rundir import sha256_file
from hubforge.scoring import (PPL_TOKENS, held_out_rows, perplexity, prompt_ids, read_jsonl, scored_held_out, stop_ids,
                              teacher_forced)
PROBE_TEXTS = (
    "سلام! می‌خواهم ۱۲۳ کتاب و ٤٥٦ دفتر بخرم؛ نیم‌فاصله‌ها مهم‌اند.",  # Persian, ZWNJ, Persian + Arabic-Indic digits
    "İstanbul'da ılık bir gün: ŞİŞLİ, Iğdır, çöğüş, İı.",  # Turkish dotted/dotless i
    "Hi 👋🏽 🇮🇷 👨\u200d👩\u200d👧 ✔️ 🫠",  # emoji: skin tone, flag, ZWJ family, variation selector
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ ∮ ﷺ ǅ Ⅻ ㈱ \u00a0nbsp \u200bzwsp",  # rare characters -> byte fallback
    "<start_of_turn>user\nسلام<end_of_turn>\n<start_of_turn>model\n<bos>x<eos>",  # control tokens in text
    "a  b   c    d\t\te\n\n\nf" + " " * 9 + "g  ",  # runs of spaces, tabs, newlines
    " leading space and 2024-11-22 12:30",
)
PROMPTS = ("سلام! حالت چطور است؟", "Write one sentence about the sea.", "Merhaba, nasılsın?")
MAX_NEW_TOKENS, SHOW_TOKENS, GGUF_PPL_ROWS = 16, 8, 25
# Mean KL(HF || llama.cpp) on the prompt tokens that the full-precision file may show. Measured: 1e-5 for Gemma 3
# 270M f16 vs HF float32 on the same weights, 1.3e-4 when HF holds them in bf16; 6e-3 for a model llama.cpp
# mis-converts (tiny Gemma 3 with query_pre_attn_scalar != head_dim), whose greedy text can still agree.
MAX_MEAN_KL = 1e-3
# A greedy step is a near-tie when the reference's top-1 log-probability exceeds its runner-up by at most this much;
# float rounding may then pick either token, so a faithful file can part from the reference there. Measured rounding
# noise |margin_HF - margin_llama.cpp| of the HF top-2 pair against the F16 file: Gemma 3 270M with float32 weights,
# 454 steps (8 prompts x 48 greedy tokens): median 0.002, p99 0.012, max 0.013; a LoRA merged into it in bf16
# (tests/test_gguf_embedded.py, 3 prompts x 16 tokens): max 0.025. Every run records it again as `margin_noise_max`.
# 0.1 is 4x the largest seen; a file that computes another function moves margins far more and fails the KL gate too.
TIE_MARGIN = 0.1
# llama-perplexity scores the second half of each ctx-token chunk and needs two chunks: the held-out text is read
# with the largest of these that fits it; below the smallest, llama.cpp's own columns are left out.
KL_CTX, MIN_KL_CTX = (512, 256, 128), 128


# The recipe sections this stage reads (part of its cache key; tests/test_layers.py checks it reads no other).
SECTIONS = ('name', 'base', 'data', 'eval', 'export', 'method', 'train')


def run(recipe, run_dir) -> dict:
    try:
        if products.gguf_skip_reason(recipe) is not None:
            return export(recipe, run_dir)
        log = run_dir.stage_dir("gguf") / "llama.log"  # llama.cpp's own output: hundreds of lines per run
        log.unlink(missing_ok=True)
        with llamacpp.log_to(log):
            return export(recipe, run_dir)
    except (llamacpp.LlamaCppError, llamatools.LlamaToolError) as exc:  # missing tools, refusals: user-facing
        raise StageError(str(exc)) from None


def export(recipe, run_dir) -> dict:
    cfg = recipe.export.gguf
    if reason := products.gguf_skip_reason(recipe):
        return {"status": "not_applicable", "reason": reason}
    merge = run_dir.manifest["stages"].get("merge", {})
    if merge.get("status") == "not_applicable":  # the merge stage's own verdict on this run (e.g. an older recipe)
        return {"status": "not_applicable", "reason": f"nothing was merged: {merge.get('result', {}).get('reason', '')}"}
    if merge.get("status") != "done" or not (run_dir.path / merge["result"].get("model_dir", "-")).is_dir():
        raise StageError(f"the gguf stage needs the merged model of the merge stage in {run_dir.path}/merge; "
                         "run with --stages merge,gguf")
    model_dir, out = run_dir.path / merge["result"]["model_dir"], run_dir.stage_dir("gguf")
    work = out / ".work"  # converter input views and the LoRA check's base GGUF; removed at the end
    shutil.rmtree(work, ignore_errors=True)

    # ---- preflight: architecture, LoRA adapter contents, disk
    arch = llamacpp.architecture(model_dir)
    if arch not in llamacpp.supported_architectures():
        raise StageError(f"llama.cpp's converter (llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION}) does not support "
                         f"architecture {arch!r} ({model_dir / 'config.json'}); set export.gguf.enabled: false to skip "
                         "GGUF export")
    adapter_dir = run_dir.path / run_dir.result("train").get("adapter_dir", "-") if cfg.lora else None
    problems = lora_problems(adapter_dir) if cfg.lora else []
    if problems:
        raise StageError("export.gguf.lora: llama.cpp would silently drop or mis-scale parts of this adapter: "
                         + "; ".join(problems) + ". Set export.gguf.lora: false (the merged GGUFs carry everything).")
    params = count_params(model_dir)
    need = int(params * sum(products.GGUF_BITS[t] for t in products.gguf_types(recipe)) / 8 * 1.1) + (params * 2 if cfg.lora else 0)
    if need > free_bytes(out):
        raise StageError(f"not enough disk for the GGUF files in {out}: about {need / 2**30:.2f} GiB needed for "
                         f"{params / 1e6:.0f}M parameters as {', '.join((cfg.outtype, *cfg.quants))}, "
                         f"{free_bytes(out) / 2**30:.2f} GiB free. Free space or list fewer export.gguf.quants.")

    # ---- convert, then check the tokenizer before anything is built on it
    tokenizer, template = chat.load_tokenizer(model_dir, recipe.base.chat_template, need_template=recipe.data.format != "text")
    full = out / products.gguf_name(recipe, cfg.outtype)
    seconds = {"convert": llamacpp.convert_model(llamacpp.converter_input(model_dir, work / "model"), full, cfg.outtype)}
    probe = tokenizer_probe(tokenizer, full)
    if not probe["ok"]:
        raise StageError(f"tokenizer probe failed: {full.name} does not tokenize like the HF tokenizer in {model_dir}: "
                         f"{probe['problems'][0]}. The GGUF would read and write different text; check that the merged "
                         "folder has the base's tokenizer.model (a Gemma checkpoint with only tokenizer.json converts "
                         "wrongly).")

    # ---- llama.cpp's own measurement: reference log-probabilities of the full-precision file on held-out text
    log = out / "llama.log"  # everything llama.cpp prints; the terminal gets one line per step (run() opened it)
    heldout, kl_ctx, kl_text = llama_text(held_out_rows(run_dir), tokenizer, template, work / "heldout.txt", special=False)
    kl_base = work / "f16.kld"
    if kl_ctx:
        seconds["kl_reference"] = llamatools.kld_base(full, heldout, kl_base, log=log, ctx=kl_ctx)["seconds"]
    # the held-out rows as training scored them (chat template, assistant turns): the HF-side table's text, and AUTO's
    ppl_ids, ppl_masks, held_out = scored_held_out(recipe, run_dir, tokenizer, template,
                                                   min(GGUF_PPL_ROWS, recipe.eval.max_samples))
    if cfg.auto.enabled and held_out["source"] != "data/eval.jsonl":
        raise StageError("export.gguf.auto measures candidate files on the run's held-out rows, and it has none "
                         "(data/eval.jsonl); set data.eval_fraction or data.eval_split, or export.gguf.auto.enabled: false")

    # ---- importance matrix on calibration text (the training split unless the recipe names a file)
    imatrix = imatrix_info = None
    if products.uses_imatrix(recipe):
        calib, ctx, calib_info = calibration_text(recipe, run_dir, tokenizer, template, work / "calibration.txt")
        imatrix = out / products.imatrix_name(recipe)
        done = gguf_imatrix.compute(full, calib, imatrix, log=log, ctx=ctx, chunks=max(1, cfg.imatrix.max_tokens // ctx),
                                    work=work)
        seconds["imatrix"] = done["seconds"]
        imatrix_info = {"file": str(imatrix.relative_to(run_dir.path)), "sha256": sha256_file(imatrix),
                        "calibration": calib_info, "tied_output_head": done["tied_head"], "tensors": done["tensors"]}
        say(f"importance matrix: {calib_info['tokens']} tokens of {calib_info['source']} ({done['seconds']:.0f} s)")

    # ---- quantize (with the matrix), and the same type without it for comparison
    from tqdm.auto import tqdm

    # one bar over the files: each quant made, then every file measured (AUTO adds one of each when it is kept)
    bar = tqdm(total=2 * len(cfg.quants) + 1, desc="[gguf] files", unit="step", disable=None)
    files, plain, fallbacks = [(cfg.outtype, full)], {}, {}
    for qtype in cfg.quants:
        bar.set_postfix_str(f"quantize {qtype}")
        files.append((qtype, out / products.gguf_name(recipe, qtype)))
        report: dict = {}
        seconds[qtype] = llamatools.quantize(full, files[-1][1], qtype, log=log, imatrix=imatrix, report=report)
        fallbacks[qtype] = report["fallbacks"]
        if imatrix and cfg.imatrix.compare_plain and kl_ctx and qtype not in products.IGNORE_IMATRIX:
            llamatools.quantize(full, work / "plain.gguf", qtype, log=log)
            plain[qtype] = kl_columns(llamatools.kld(work / "plain.gguf", kl_base, log=log, ctx=kl_ctx))
            plain[qtype]["size"] = (work / "plain.gguf").stat().st_size
        bar.update()

    if note := fallback_note(fallbacks):
        say(note)

    # ---- the smallest per-tensor mixture that meets the recipe's budget, measured before it counts
    auto = None
    if cfg.auto.enabled:
        auto = auto_mixture(recipe, full, work, (ppl_ids, ppl_masks), imatrix, log, out)
        seconds["auto"] = auto.pop("seconds")
        if auto["meets"]:
            files.append((products.AUTO_GGUF_TYPE, out / products.gguf_name(recipe, products.AUTO_GGUF_TYPE)))
            bar.total += 1
    started = time.monotonic()
    llama_kl = {qtype: kl_columns(llamatools.kld(path, kl_base, log=log, ctx=kl_ctx)) if kl_ctx else None
                for qtype, path in files}
    seconds["kl_files"] = time.monotonic() - started

    # ---- every file loads, generates and is measured against the merged HF model
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) if tokenizer.chat_template
               else list(tokenizer(p)["input_ids"]) for p in (recipe.eval.prompts or PROMPTS)[:3]]
    stop = set(stop_ids(model_dir))
    started = time.monotonic()
    reference = hf_reference(model_dir, prompts, ppl_ids, ppl_masks, stop)
    rows = []
    for qtype, path in files:
        bar.set_postfix_str(f"measure {qtype}")
        rows.append(measure(path, qtype, prompts, (ppl_ids, ppl_masks), reference, stop, run_dir))
        bar.update()
    bar.close()
    seconds["measure_vs_hf"] = time.monotonic() - started
    for row in rows:
        row["delta_ppl_vs_f16"] = round(row["perplexity"] - rows[0]["perplexity"], 6)
        misses = [] if row is rows[0] else quality_misses(row, rows[0], recipe.export.gguf.auto)
        row["recommended"] = not misses  # the recipe's quality bar, the one AUTO is held to
        row["not_recommended_because"] = "; ".join(misses) or None
        row["imatrix"] = imatrix is not None and row is not rows[0] and row["type"] not in products.IGNORE_IMATRIX
        row["llama_cpp"] = llama_kl[row["type"]]
        row["without_imatrix"] = plain.get(row["type"])
        row["fallbacks"] = fallbacks.get(row["type"], [])
        if row["type"] == products.AUTO_GGUF_TYPE:
            row["quantize_args"], row["tensor_types"] = auto["quantize_args"], auto["types"]
    if auto and auto["meets"]:
        rows = hf_check_auto(recipe, rows, auto, out)
    decisive = [d for d in rows[0]["greedy_divergences"] if not d["tie"]]
    if decisive or rows[0]["kl_vs_hf"] > MAX_MEAN_KL:
        bad = decisive[0]["prompt"] - 1 if decisive else 0
        where = (f"at generated token {decisive[0]['position'] + 1} where the HF model's choice leads its runner-up by "
                 f"{decisive[0]['hf_margin']:.3g} (a near-tie is <= {TIE_MARGIN:g}); " if decisive else "")
        raise StageError(f"{full.name} does not reproduce the merged HF model: mean KL {rows[0]['kl_vs_hf']:.2g} on the "
                         f"prompt tokens (limit {MAX_MEAN_KL:g}), next-token agreement {rows[0]['top1_agreement_vs_hf']:.0%}, "
                         f"{where}greedy {rows[0]['greedy'][bad][:SHOW_TOKENS]} vs HF {reference['greedy'][bad][:SHOW_TOKENS]} "
                         f"(prompt {bad + 1}). The converter does not represent this model faithfully (e.g. a config field "
                         "llama.cpp ignores).")

    # ---- LoRA adapter as GGUF: base f16 + adapter must reproduce the merged f16
    lora = lora_gguf(recipe, run_dir, adapter_dir, full, prompts, stop, work) if cfg.lora else None
    shutil.rmtree(work, ignore_errors=True)
    for row in rows:  # a file over export.gguf.split_above goes to the repo as its llama-gguf-split parts
        if parts := llamatools.split_if_larger(run_dir.path / row["file"], cfg.split_above, log=out / "llama.log"):
            row["parts"] = [{"file": str(p.relative_to(run_dir.path)), "size": p.stat().st_size, "sha256": sha256_file(p)}
                            for p in parts]
    runtime = ollama.write_files(out, tokenizer, tokenizer.chat_template)  # `template` + `params` for Ollama
    runtime["files"] = [f"gguf/{name}" for name in runtime["files"]]
    quality = {"model": recipe.name, "architecture": arch, "held_out": held_out, "max_new_tokens": MAX_NEW_TOKENS,
               "reference": {"model": "merged HF checkpoint, float32 compute", "perplexity": reference["perplexity"]},
               "llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON_VERSION, "threads": os.cpu_count(),
               "columns": {"perplexity": f"exp(mean NLL) on the held-out {held_out['tokens_scored']} tokens (llama.cpp)",
                           "kl_vs_hf": "mean KL(merged HF || GGUF) on the prompt tokens",
                           "top1_agreement_vs_hf": "share of prompt positions with the same next-token argmax",
                           "heldout_top1_vs_hf": "share of the held-out positions perplexity scores where the file "
                                                 "and the merged model pick the same next token",
                           "greedy_agreement": f"share of the HF greedy continuation (<= {MAX_NEW_TOKENS} tokens) reproduced",
                           "decisive_agreement": "share of the HF greedy continuation's steps that are not near-ties "
                                                 f"(HF top-2 margin > {TIE_MARGIN:g}) where the GGUF, fed the HF tokens, "
                                                 "picks the HF token",
                           "greedy_divergences": "per prompt that decoded differently: the first differing position and "
                                                 "the HF top-2 log-probability margin there (tie: <= tie_margin)",
                           "margin_noise_max": "largest |HF - GGUF| difference of the step margins along the HF "
                                               "continuation (rounding noise for a faithful file)",
                           "recommended": f"heldout_top1_vs_hf >= {cfg.auto.min_top1} and perplexity <= "
                                          f"{1 + cfg.auto.max_ppl_increase:g} x the full-precision file's (the recipe's "
                                          "export.gguf.auto bar; always for the full-precision file)"},
               "tie_margin": TIE_MARGIN,
               "llama_cpp_kld": {"text": kl_text, "ctx": kl_ctx or None, "log": "gguf/llama.log",
                                 "columns": {"mean_kld": "mean KL(F16 || file) per position (llama-perplexity "
                                                         "--kl-divergence)", "p99_kld": "99th percentile of the KL",
                                             "same_top": "share of positions where the file's top token is the F16 "
                                                         "file's", "ppl": "the file's perplexity on this text",
                                             "ln_ppl_ratio": "mean ln(PPL(file) / PPL(F16))"}},
               "imatrix": imatrix_info, "auto": auto,
               "files": [{k: v for k, v in r.items() if k != "greedy"} for r in rows]}
    (out / "quality.json").write_text(json.dumps(quality, indent=2, ensure_ascii=False), "utf-8")
    for row in rows:
        say(verdict(row))
    return {"files": quality["files"], "quality": "gguf/quality.json", "held_out": held_out, "tokenizer_probe": probe,
            "imatrix": imatrix_info, "llama_cpp_kld": {"ctx": kl_ctx or None, **kl_text},
            "auto": auto and {k: auto.get(k) for k in ("meets", "size", "types", "quantize_args", "limits", "budget",
                                                       "reason", "hf_check")},
            "lora_gguf": lora, "ollama": runtime, "outtype": cfg.outtype,
            "quality_bar": {"min_top1": cfg.auto.min_top1, "max_ppl_increase": cfg.auto.max_ppl_increase},
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "converter": f"llama.cpp from the llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION} sdist"}


# ---------------------------------------------------------------- llama.cpp's tools: texts, matrix, mixture
def say(message: str) -> None:
    print(f"[gguf] {message}", flush=True)


def llama_text(rows: list[dict], tokenizer, template, dest: Path, *, special: bool,
               max_tokens: int | None = None) -> tuple[Path, int, dict]:
    """Rows as training tokenised them, decoded into one text file for llama.cpp's tools; the context size to read
    it with (the largest of KL_CTX giving two chunks, 0 when it is too short) and a description.
    special=True keeps the control tokens (llama-imatrix parses them) minus the first BOS (llama.cpp adds one);
    False drops them: llama-perplexity reads text as text, and would score the spelled-out pieces of
    `<start_of_turn>`, positions no user ever sees."""
    pieces, tokens = [], 0
    for row in rows:
        ids = chat.token_ids(tokenizer, {k: v for k, v in row.items() if k != "qa"}, template)
        pieces.append(tokenizer.decode(ids, skip_special_tokens=not special))
        tokens += len(ids)
        if max_tokens and tokens >= max_tokens:
            break
    text = "".join(pieces)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text.removeprefix(tokenizer.bos_token or "") if special else text, "utf-8")
    ctx = next((c for c in KL_CTX if tokens >= 2 * c), 0)
    return dest, ctx, {"rows": len(pieces), "tokens": tokens}


def calibration_text(recipe, run_dir, tokenizer, template, dest: Path) -> tuple[Path, int, dict]:
    """The importance matrix's text: export.gguf.imatrix.file, else the training split as training saw it."""
    cfg = recipe.export.gguf.imatrix
    if cfg.file:
        try:
            path = confine(recipe.root, cfg.file)  # checked when the recipe loaded; the tree may have changed since
        except ValueError as exc:
            raise StageError(f"export.gguf.imatrix.file: {exc}") from None
        text = path.read_text("utf-8")
        tokens = len(tokenizer(text)["input_ids"])
        dest.write_text(text, "utf-8")
        info = {"source": cfg.file, "rows": None, "tokens": tokens}
        ctx = next((c for c in KL_CTX if tokens >= 2 * c), 0)
    else:
        if not (run_dir.path / "data" / "train.jsonl").is_file():
            raise StageError(f"export.gguf.imatrix calibrates on the training split, and {run_dir.path}/data/train.jsonl "
                             "is missing: run the data stage again, or name export.gguf.imatrix.file")
        rows = read_jsonl(run_dir.path / "data" / "train.jsonl")
        dest, ctx, info = llama_text(rows, tokenizer, template, dest, special=True, max_tokens=cfg.max_tokens)
        info = {"source": "the training split (data/train.jsonl) rendered with the chat template", **info}
    if not ctx:
        raise StageError(f"export.gguf.imatrix: the calibration text has {info['tokens']} tokens, fewer than the "
                         f"{2 * MIN_KL_CTX} llama-imatrix needs; name a longer export.gguf.imatrix.file or set "
                         "export.gguf.imatrix.enabled: false")
    return dest, ctx, {**info, "ctx": ctx, "chunks": min(info["tokens"], recipe.export.gguf.imatrix.max_tokens) // ctx}


def fallback_note(fallbacks: dict[str, list[dict]]) -> str | None:
    """One line for every quant's type fallbacks (llama-quantize prints one warning per tensor and file)."""
    seen: dict[tuple, int] = {}
    for rows in fallbacks.values():
        for f in rows:
            key = (f["columns"], f["block"], f["wanted"], f["used"])
            seen[key] = max(seen.get(key, 0), f["tensors"])
    if not seen:
        return None
    parts = ", ".join(f"{w}->{u} ({n})" for (_, _, w, u), n in sorted(seen.items()))
    widths = sorted({(c, b) for c, b, _, _ in seen})
    why = "; ".join(f"{c} columns are not a multiple of {b}" for c, b in widths)
    return f"type fallbacks in {sum(1 for v in fallbacks.values() if v)} of {len(fallbacks)} quants, tensors per file: {parts} because {why} (details: quality.json)"


def kl_columns(measured: dict) -> dict:
    return {k: measured[k] for k in ("mean_kld", "p99_kld", "same_top", "ppl", "ln_ppl_ratio")}


def auto_mixture(recipe, full: Path, work: Path, held_out: tuple, imatrix: Path | None, log: Path, out: Path) -> dict:
    """export.gguf.auto: the smallest per-tensor mixture (hubforge.gguf_auto) whose next-token choices and perplexity
    stay within the budget of the full-precision file's, measured by llama.cpp on the held-out conversations as
    training scored them (the chat markers included, which llama-perplexity cannot read: on text stripped of them
    a 16-step fine-tune's candidate agreed with F16 on 91.6 % of positions and with the merged model on 75.8 % of
    the assistant tokens). A file that misses the budget is deleted: it is recorded, never published."""
    cfg = recipe.export.gguf.auto
    limits = {"disagree": round(1 - cfg.min_top1, 6), "ln_ppl_ratio": round(math.log1p(cfg.max_ppl_increase), 6)}
    budget = {"min_top1": cfg.min_top1, "max_ppl_increase": cfg.max_ppl_increase}
    dest = out / products.gguf_name(recipe, products.AUTO_GGUF_TYPE)
    start = time.monotonic()
    say(f"auto: searching per-tensor types for same-top >= {cfg.min_top1:g} and perplexity <= +{cfg.max_ppl_increase:.0%} "
        f"(each probe: one quantize + one KL run; details in {log.name})")
    reference = llamacpp.scored_logprobs(full, *held_out)

    def measure(path: Path) -> dict:
        return llamacpp.compare_scored(reference, llamacpp.scored_logprobs(path, *held_out))

    try:
        with open(log, "a", encoding="utf-8") as fh:
            got = gguf_auto.auto(full, work / "auto", None, limits, log=log, out=dest, imatrix=imatrix, measure=measure,
                                 progress=lambda m: print(m, file=fh, flush=True))
    except ValueError as exc:  # no mixture of the candidate types meets the budget by the measured costs
        return {"meets": False, "reason": str(exc), "limits": limits, "budget": budget, "size": None, "types": None,
                "seconds": round(time.monotonic() - start, 1)}
    if not got["meets"]:
        dest.unlink(missing_ok=True)
    probes = sum(1 for g in got["groups"] for o in g["options"] if o["cost"])
    say(f"auto: {'found' if got['meets'] else 'no file meets the budget; best try'} {got['size'] / 2**20:.1f} MiB "
        f"after {probes} probes and {got['tries']} tries ({time.monotonic() - start:.0f} s)")
    return {"meets": got["meets"], "limits": limits, "budget": budget, "size": got["size"], "types": got["types"],
            # as a user types it in a folder holding the downloaded files (the matrix is published beside them)
            "quantize_args": ["llama-quantize", *[Path(a).name if imatrix and a == str(imatrix) else a
                                                  for a in got["quantize_args"]], full.name, dest.name, gguf_auto.REFERENCE],
            "estimate": got["estimate"], "measured": got["measured"], "tries": got["tries"],
            "probes": probes, "groups": got["groups"], "seconds": round(time.monotonic() - start, 1)}


def quality_misses(row: dict, full: dict, bar) -> list[str]:
    """How a file falls short of the recipe's quality bar (export.gguf.auto's min_top1 and max_ppl_increase, set
    or default): held-out next-token agreement with the merged model, and perplexity against the full-precision
    file's. Empty when it meets both. AUTO must meet it to be published; any other file is marked not recommended."""
    limit = ppl_limit(full, bar)
    misses = ([f"held-out next-token agreement {row['heldout_top1_vs_hf']:.1%} < {bar.min_top1:.0%}"]
              if row["heldout_top1_vs_hf"] < bar.min_top1 else [])
    return misses + ([f"perplexity {row['perplexity']:.4g} > {limit:.4g}"] if row["perplexity"] > limit else [])


def ppl_limit(full: dict, bar) -> float:
    return full["perplexity"] * (1 + bar.max_ppl_increase)


def hf_check_auto(recipe, rows: list[dict], auto: dict, out: Path) -> list[dict]:
    """The AUTO file is held to its budget once more on the HF side, against the merged model itself: held-out
    next-token agreement >= min_top1 and perplexity over the scored tokens within max_ppl_increase of the F16
    file's. The search's llama.cpp measurement is on plain text (chat markers cannot be fed to llama-perplexity);
    this one is on the conversations as training scored them. A file that misses is deleted, never published."""
    cfg = recipe.export.gguf.auto
    row = next(r for r in rows if r["type"] == products.AUTO_GGUF_TYPE)
    misses = quality_misses(row, rows[0], cfg)
    auto["hf_check"] = {"heldout_top1_vs_hf": row["heldout_top1_vs_hf"], "perplexity": row["perplexity"],
                        "perplexity_limit": round(ppl_limit(rows[0], cfg), 6), "meets": not misses}
    if misses:
        auto.update(meets=False, reason="llama.cpp's measurement met the budget but the check against the merged "
                                        "model did not: " + "; ".join(misses))
        (out / products.gguf_name(recipe, products.AUTO_GGUF_TYPE)).unlink(missing_ok=True)
        say(f"auto: {auto['reason']}; not published")
    return [r for r in rows if r is not row] if misses else rows


def verdict(row: dict) -> str:
    kl = row.get("llama_cpp") or {}
    same = f", same top {kl['same_top']:.1%}" if kl else ""
    return (f"{Path(row['file']).name}: {row['size'] / 2**20:.1f} MiB, next-token agreement with the merged model "
            f"{row['heldout_top1_vs_hf']:.1%} held out / {row['top1_agreement_vs_hf']:.0%} on the prompts{same}, "
            f"perplexity {row['perplexity']:.3g}" + ("" if row["recommended"] else " (not recommended)"))


# ---------------------------------------------------------------- checks
def lora_problems(adapter_dir: Path) -> list[str]:
    """What in a PEFT LoRA adapter llama.cpp's convert_lora_to_gguf.py + runtime would not apply as PEFT does."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text("utf-8"))
    problems = [f"modules_to_save {config['modules_to_save']} (fully trained copies)"] if config.get("modules_to_save") else []
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    problems += [f"target module {t!r} (embeddings / output head)" for t in targets
                 if t.split(".")[-1] in ("lm_head", "embed_tokens", "wte", "word_embeddings")]
    # llama.cpp scales every layer by lora_alpha / r and has neither DoRA nor trainable tokens
    problems += [f"{key}={config[key]!r}" for key in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                                      "trainable_token_indices") if config.get(key)]
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}")
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as fh:
        extra = [k for k in fh.keys() if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    return problems + ([f"{len(extra)} non-LoRA tensors such as {extra[0]!r}"] if extra and not problems else [])


def tokenizer_probe(tokenizer, gguf_path: Path) -> dict:
    """Encode/decode PROBE_TEXTS with the HF tokenizer and with llama.cpp's reading of the GGUF vocabulary."""
    problems = []
    with closing(llamacpp.load(gguf_path, vocab_only=True)) as llm:
        for text in PROBE_TEXTS:
            hf_ids = list(tokenizer.encode(text, add_special_tokens=False))
            gg_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            hf_text = tokenizer.decode(hf_ids, skip_special_tokens=False)
            gg_text = llm.detokenize(hf_ids, special=True).decode("utf-8", errors="replace")
            if hf_ids != gg_ids:
                problems.append(f"{text!r} encodes as {hf_ids[:24]} (HF) vs {gg_ids[:24]} (GGUF)")
            elif hf_text != gg_text:
                problems.append(f"{hf_ids[:24]} decodes as {hf_text!r} (HF) vs {gg_text!r} (GGUF)")
        ids = {"bos": [tokenizer.bos_token_id, llm.token_bos()], "eos": [tokenizer.eos_token_id, llm.token_eos()]}
        template = llm.metadata.get("tokenizer.chat_template")
    problems += [f"{name} id {hf} (HF) vs {gg} (GGUF)" for name, (hf, gg) in ids.items() if hf is not None and hf != gg]
    if template != tokenizer.chat_template:
        problems.append("the chat template in the GGUF " + ("is missing" if template is None else "differs from the HF one"))
    return {"ok": not problems, "texts": len(PROBE_TEXTS), "problems": problems, "bos_eos": ids,
            "chat_template": template is not None and template == tokenizer.chat_template}


# ---------------------------------------------------------------- measurements
def hf_reference(model_dir: Path, prompts: list[list[int]], ppl_ids: list[list[int]], ppl_masks: list[list[int]],
                 stop: set[int]) -> dict:
    """Greedy tokens and held-out perplexity of the merged checkpoint in float32 (what the GGUFs are held to), and
    its log-probabilities over each prompt followed by its own greedy continuation (for the teacher-forced check)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    greedy, logprobs = [], []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
            greedy.append(out[: next((i + 1 for i, t in enumerate(out) if t in stop), len(out))])
            logprobs.append(model(torch.tensor([ids + greedy[-1]])).logits[0].double().log_softmax(-1))
    choices: list = []  # the merged model's next-token choice at every scored held-out position (held-out agreement)
    return {"greedy": greedy, "logprobs": logprobs, "perplexity": perplexity(model, ppl_ids, ppl_masks, choices),
            "choices": choices}


def measure(path: Path, qtype: str, prompts, held_out: tuple, reference: dict, stop: set[int], run_dir) -> dict:
    """One row of the quality table: the file loads in llama.cpp, generates, and how close it stays to the HF model."""
    import numpy as np

    with closing(llamacpp.load(path, n_ctx=max(PPL_TOKENS, 512))) as llm:  # one load for every measurement
        choices: list = []
        ppl = llamacpp.perplexity(llm, *held_out, choices=choices)
        forced = [llamacpp.logits(llm, ids + ref) for ids, ref in zip(prompts, reference["greedy"])]
        stats = llamacpp.model_stats(llm)
        greedy = [llamacpp.greedy(llm, ids, MAX_NEW_TOKENS, stop)[0] for ids in prompts]
        rate = llamacpp.greedy(llm, prompts[0], 32, set())[1]
    kl, top1 = teacher_forced([lp[: len(ids)] for lp, ids in zip(reference["logprobs"], prompts)],
                              [f[: len(ids)] for f, ids in zip(forced, prompts)])
    check = greedy_check(prompts, reference["greedy"], reference["logprobs"], greedy, forced)
    shared = [common_prefix(ref, got) for ref, got in zip(reference["greedy"], greedy)]
    return {"file": str(path.relative_to(run_dir.path)), "type": qtype, "size": path.stat().st_size,
            "sha256": sha256_file(path),
            "bits_per_weight": stats["bits_per_weight"], "perplexity": round(ppl, 6), "tokens_per_s": round(rate, 1),
            "kl_vs_hf": float(f"{kl:.3g}"), "top1_agreement_vs_hf": round(top1, 4),
            "heldout_top1_vs_hf": round(float(np.mean(np.concatenate(
                [got == want for got, want in zip(choices, reference["choices"])]))), 4),
            "greedy_agreement": round(sum(n / max(len(r), 1) for n, r in zip(shared, reference["greedy"])) / len(prompts), 4),
            **check, "greedy": greedy}


def lora_gguf(recipe, run_dir, adapter_dir: Path, merged_full: Path, prompts, stop: set[int], work: Path) -> dict:
    """Convert the adapter; base f16 GGUF + adapter must compute what the merged f16 GGUF computes.

    Measured like f16 vs HF (greedy parting only at near-ties, mean KL on the prompt tokens) and gated on the KL
    (see below), since the merged file holds W + ΔW rounded to merge_dtype while llama.cpp adds ΔW at run time;
    whether the whole text matched is recorded."""
    import torch

    base_dir = resolve_base(recipe)
    out = run_dir.stage_dir("gguf") / products.gguf_name(recipe, products.LORA_GGUF_TYPE)
    base_gguf = work / "base-F16.gguf"
    seconds = llamacpp.convert_lora(adapter_dir, base_dir, out, "F16")
    llamacpp.convert_model(llamacpp.converter_input(base_dir, work / "base"), base_gguf, "F16")
    merged = run_prompts(merged_full, prompts, stop)
    adapted, base_only = (run_prompts(base_gguf, prompts, stop, lora, follow=merged["greedy"]) for lora in (out, None))
    reference = [torch.from_numpy(x[: len(ids)]).log_softmax(-1) for x, ids in zip(merged["logits"], prompts)]
    kl, top1 = teacher_forced(reference, [x[: len(ids)] for x, ids in zip(adapted["logits"], prompts)])
    check = greedy_check(prompts, merged["greedy"], merged["logits"], adapted["greedy"], adapted["logits"])
    exact = not [d for d in check["greedy_divergences"] if not d["tie"]]
    kl_without = teacher_forced(reference, [x[: len(ids)] for x, ids in zip(base_only["logits"], prompts)])[0]
    merge = run_dir.result("merge")
    into = merge.get("merge_into")
    # The gate is the distribution, not greedy text: the merged file holds W + ΔW rounded to merge_dtype while
    # llama.cpp adds ΔW to the f16 base at run time, so the two differ by that rounding (the merge stage measures it:
    # mean KL ~6e-4 for Gemma 3 270M in bf16) and a near-tie may flip a greedy token. An adapter that llama.cpp drops
    # or scales wrongly shows up as KL on top of the rounding, and fails to explain what separates base from merged.
    limit = MAX_MEAN_KL + ((merge.get("dtype_rounding") or {}).get("mean_kl") or 0.0)
    if into == "original" and (kl > limit or (kl_without > MAX_MEAN_KL and kl > 0.25 * kl_without)):
        raise StageError(f"{out.name} on the base f16 GGUF does not compute what the merged f16 GGUF computes: mean KL "
                         f"{kl:.2g} (limit {limit:.2g}; base without the adapter: {kl_without:.2g}), top-1 agreement "
                         f"{top1:.3f}; llama.cpp does not apply this adapter as PEFT does")
    return {"file": str(out.relative_to(run_dir.path)), "size": out.stat().st_size, "sha256": sha256_file(out),
            "seconds": round(seconds, 2), "kl_vs_merged": float(f"{kl:.3g}"), "top1_agreement_vs_merged": round(top1, 4),
            "exact_prefix_ok": exact, "same_greedy_as_merged": adapted["greedy"] == merged["greedy"], **check,
            "kl_base_without_adapter_vs_merged": float(f"{kl_without:.3g}"), "kl_limit": float(f"{limit:.3g}"),
            "adapter_changes_output": base_only["greedy"] != merged["greedy"], "base": recipe.base.model,
            "note": None if into == "original" else "QLoRA merged into the dequantized base: the adapter on the original "
                                                    "base is expected to differ slightly; not gated"}


def run_prompts(path: Path, prompts, stop: set[int], lora: Path | None = None, follow: list | None = None) -> dict:
    """llama.cpp's greedy continuation of each prompt, and its logits over the prompt followed by `follow[i]`
    (default: its own continuation)."""
    with closing(llamacpp.load(path, n_ctx=512, lora=lora)) as llm:
        greedy = [llamacpp.greedy(llm, ids, MAX_NEW_TOKENS, stop)[0] for ids in prompts]
        return {"greedy": greedy, "logits": [llamacpp.logits(llm, ids + cont) for ids, cont in zip(prompts, follow or greedy)]}


def greedy_check(prompts, ref_greedy, ref_logprobs, got_greedy, got_forced) -> dict:
    """Greedy decoding compared where it is decided: a step whose reference top-2 margin is <= TIE_MARGIN is a
    near-tie that float rounding may settle either way, so parting there is not a fault.

    `ref_logprobs[i]` / `got_forced[i]`: log-probabilities (or logits) over prompt i followed by the reference's
    greedy continuation. Returns the teacher-forced agreement on the decided steps (the other model fed the
    reference's tokens, so one tie cannot derail the rest), and per prompt that decoded differently the first
    differing position with the reference's margin there."""
    import numpy as np

    decided = agree = 0
    noise, divergences = 0.0, []
    for i, (ids, ref, got) in enumerate(zip(prompts, ref_greedy, got_greedy)):
        steps = slice(len(ids) - 1, len(ids) - 1 + len(ref))  # the rows that predict the continuation's tokens
        margin, forced = step_margins(np.asarray(ref_logprobs[i])[steps], ref), np.asarray(got_forced[i])[steps]
        choice = forced.argmax(-1)
        noise = max(noise, float(np.abs(margin - step_margins(forced, ref)).max(initial=0.0)))
        decided += int((margin > TIE_MARGIN).sum())
        agree += int(((margin > TIE_MARGIN) & (choice == np.asarray(ref))).sum())
        first = common_prefix(ref, got)
        if ref != got:
            hf_margin = float(margin[first]) if first < len(ref) else None
            divergences.append({"prompt": i + 1, "position": first, "hf_margin": None if hf_margin is None else
                                float(f"{hf_margin:.4g}"), "tie": hf_margin is not None and hf_margin <= TIE_MARGIN})
        # a decided step that the other model, fed the same tokens, gets wrong is a divergence even when free-running
        # decoding parted earlier at a tie and so never reached it
        wrong = np.flatnonzero((margin > TIE_MARGIN) & (choice != np.asarray(ref)))
        if len(wrong) and not (ref != got and first == wrong[0]):
            divergences.append({"prompt": i + 1, "position": int(wrong[0]), "hf_margin": float(f"{margin[wrong[0]]:.4g}"),
                                "tie": False, "teacher_forced": True})
    return {"decisive_agreement": round(agree / decided, 4) if decided else 1.0, "greedy_divergences": divergences,
            "margin_noise_max": float(f"{noise:.3g}")}


def step_margins(logprobs, tokens: list[int]):
    """Per step: the chosen token's log-probability minus the best other token's (negative if it was not the top)."""
    import numpy as np

    rows = np.arange(len(tokens))
    chosen = logprobs[rows, tokens]
    others = logprobs.copy()
    others[rows, tokens] = -np.inf
    return chosen - others.max(-1)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free
