"""Merge stage: fold the LoRA/QLoRA adapter into a 16-bit copy of the base, verify it, save a complete checkpoint.

    hubforge run recipes/gemma-3-270m/persian-chat-lora.yaml --stages merge

Output `merge/model/`: safetensors in `export.merge_dtype`, config, generation_config, tokenizer files (with
`tokenizer.model` when the base has one) and chat_template.jinja: what the merged repo, evaluate and gguf need.

Verification, comparing like with like. The reference is the PEFT model on the base weights rounded to
merge_dtype (the "16-bit copy"), computed in float32. The merge adds the LoRA delta to those weights in float32:
its logits vs the reference on held-out rows give `max_abs_logit_diff` and `mean_kl`, and the stage refuses when
max |Δ| > export.merge_max_abs_logit_diff. That is the merge itself (a wrong scale, a missed module, a double
adapter). Then W + ΔW is rounded once to merge_dtype and saved; the files are loaded back and must reproduce the
rounded model's logits (else the checkpoint is broken). What the rounding costs is reported as `dtype_rounding`,
not gated: it is the recipe's dtype choice, present in every bf16 export, and on Gemma 3 270M (logits up to ~100)
it alone reaches max |Δ| 0.39 with mean KL 1e-4 (measured), far above any useful merge threshold.

QLoRA: the adapter was trained against NF4-dequantized weights, so merging into the original weights is not the
same function. Both targets are measured: `original` (base rounded to merge_dtype) and `dequantized` (the NF4
weights of the same bitsandbytes config as training, dequantized, rounded to merge_dtype); held-out perplexity of
each merged model and of the 4-bit PEFT model as trained, plus KL to the latter. `export.merge_into: auto` keeps
the merged model with the lower perplexity. LoRA merges into `original`.

Prompt and P-tuning learn virtual tokens, not weight deltas: not_applicable (gguf follows). `full` has no adapter:
its checkpoint is cast to merge_dtype and saved the same way; its numbers are the cast's cost (nothing to gate).
"""
from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

from hubforge import chat, products
from hubforge.errors import StageError
from hubforge.models import copy_tokenizer_model, load, load_quantized, resolve_base
from hubforge.scoring import compare, held_out_ids, logits, perplexity

# Full-vocabulary logits of the compare rows stay in memory (Gemma: 262k floats per position), so keep them few.
COMPARE_ROWS, COMPARE_TOKENS = 4, 64
PPL_ROWS = 16


# The recipe sections this stage reads (part of its cache key; tests/test_layers.py checks it reads no other).
SECTIONS = ('base', 'method', 'export', 'eval', 'data')


def run(recipe, run_dir) -> dict:
    m, export = recipe.method, recipe.export
    if reason := products.merge_skip_reason(recipe):
        return {"status": "not_applicable", "reason": reason}
    train = run_dir.result("train")
    source = train.get("adapter_dir" if m.is_adapter else "model_dir")
    if not source or not (run_dir.path / source).is_dir():
        raise StageError(f"the merge stage needs the train stage's {'adapter' if m.is_adapter else 'model'} in "
                         f"{run_dir.path}/train; run with --stages train,merge")
    import torch

    # ---- inputs: base, tokenizer as in training, held-out token ids
    base_dir = resolve_base(recipe)
    tokenizer, template = chat.load_tokenizer(base_dir, recipe.base.chat_template, need_template=recipe.data.format != "text")
    ppl_ids, held_out = held_out_ids(run_dir, tokenizer, template, min(PPL_ROWS, recipe.eval.max_samples))
    compare_ids = [ids[:COMPARE_TOKENS] for ids in ppl_ids[:COMPARE_ROWS]]
    dtype = getattr(torch, export.merge_dtype)
    started = time.time()

    # ---- merge (each target: reference logits, merge error, rounded logits, perplexity), keep the chosen one
    if m.name == "full":
        model = load(run_dir.path / source, torch.float32)
        reference, chosen, measured = logits(model, compare_ids), None, {}
        ppl = {"trained": perplexity(model, ppl_ids)}
        rounded = logits(round_weights(model, dtype), compare_ids)
        merged, checked = model.to(dtype), dict(zip(("max_abs_logit_diff", "mean_kl"), compare(reference, rounded)))
        checked["dtype_rounding"] = dict(checked)
    else:
        trained = trained_qlora(recipe, base_dir, run_dir.path / source, ppl_ids, compare_ids) if m.name == "qlora" else None
        candidates, measured = {}, {}
        for target in (("original", "dequantized") if m.name == "qlora" else ("original",)):
            merged, rounded, measured[target] = merge_into(recipe, base_dir, run_dir.path / source, target, dtype,
                                                           ppl_ids, compare_ids, trained)
            candidates[target] = (merged, rounded)
        chosen = pick_target(measured, export.merge_into if m.name == "qlora" else "original")
        merged, rounded = candidates.pop(chosen)
        candidates.clear()
        gc.collect()
        checked = measured[chosen]
        ppl = {"peft": trained["ppl"] if trained else checked["ppl_peft"]}
        ppl |= {f"merged_{t}": v["ppl"] for t, v in measured.items()}
        if checked["max_abs_logit_diff"] > export.merge_max_abs_logit_diff:
            raise StageError(f"merge refused: merged into the {chosen} weights, the model's logits differ from the PEFT "
                             f"model's by up to {checked['max_abs_logit_diff']:.4g} (mean KL {checked['mean_kl']:.3g}) on "
                             f"{len(compare_ids)} held-out rows, more than export.merge_max_abs_logit_diff = "
                             f"{export.merge_max_abs_logit_diff} (both in float32 on the same {export.merge_dtype} base "
                             "weights, so this is not rounding). The adapter does not merge as PEFT applies it.")

    # ---- save everything a user needs, then check the files reproduce the rounded model
    model_dir = run_dir.stage_dir("merge") / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    merged.to(dtype).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    copy_tokenizer_model(base_dir, model_dir)
    del merged
    gc.collect()
    saved = load(model_dir, torch.float32)
    file_diff = compare(rounded, logits(saved, compare_ids))[0]
    if file_diff > 1e-4:
        raise StageError(f"the saved checkpoint in {model_dir} does not reproduce the merged model (max |Δ logit| "
                         f"{file_diff:.3g} after loading it back); its config or weights were not written as merged")
    if m.name == "full":
        ppl["merged"] = perplexity(saved, ppl_ids)
    return {
        "model_dir": str(model_dir.relative_to(run_dir.path)), "dtype": export.merge_dtype, "merge_into": chosen,
        "merge_into_setting": export.merge_into if m.name == "qlora" else None,
        "max_abs_logit_diff": round(checked["max_abs_logit_diff"], 6), "mean_kl": checked["mean_kl"],
        "threshold": export.merge_max_abs_logit_diff, "gated": m.name != "full", "dtype_rounding": checked["dtype_rounding"],
        "saved_files_max_abs_logit_diff": file_diff, "ppl": ppl, "targets": measured,
        "held_out": {**held_out, "compare_rows": len(compare_ids), "compare_tokens": sum(map(len, compare_ids))},
        "reference": "full checkpoint in float32" if m.name == "full"
                     else f"PEFT model on the base rounded to {export.merge_dtype}, float32 compute",
        "seconds": round(time.time() - started, 2),
    }


# ---------------------------------------------------------------- models
def load_base(recipe, base_dir: Path, target: str, dtype):
    """The base as a 16-bit copy (`original`) or as training saw it (`dequantized` NF4), held in float32 for the math."""
    import torch

    if target == "dequantized":
        model = load_quantized(recipe, base_dir)
        model.dequantize()  # the same NF4 code book + absmax the adapter was trained against, as dense weights
    else:
        model = load(base_dir, torch.float32)
    return round_weights(model, dtype).eval()


def merge_into(recipe, base_dir: Path, adapter_dir: Path, target: str, dtype, ppl_ids, compare_ids, trained):
    """(merged model in `dtype`, its logits on compare_ids, measurements) for one merge target."""
    import torch
    from peft import PeftModel

    peft = PeftModel.from_pretrained(load_base(recipe, base_dir, target, dtype), adapter_dir).eval()
    reference = logits(peft, compare_ids)
    stats = {"ppl_peft": perplexity(peft, ppl_ids)}
    merged = fold(peft)  # W + ΔW in float32
    stats["max_abs_logit_diff"], stats["mean_kl"] = compare(reference, logits(merged, compare_ids))
    round_weights(merged, dtype)  # rounded once, as the saved file will hold it
    rounded = logits(merged, compare_ids)
    stats["dtype_rounding"] = dict(zip(("max_abs_logit_diff", "mean_kl"), compare(reference, rounded)))
    stats["ppl"] = perplexity(merged, ppl_ids)
    if trained is not None:
        stats["kl_vs_trained_4bit"] = compare(trained["logits"], rounded)[1]
    return merged.to(dtype), rounded, stats


def round_weights(model, dtype):
    """Round every parameter to `dtype` and hold it in float32 again. Parameters only: buffers such as rotary
    frequencies are recomputed in float32 when a checkpoint is loaded, so rounding them would not match the files."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype).to(torch.float32)
    return model


def fold(peft):
    """Merge the adapter into the base weights (PEFT's own merge; a seam for tests that simulate a wrong one)."""
    return peft.merge_and_unload()


def trained_qlora(recipe, base_dir: Path, adapter_dir: Path, ppl_ids, compare_ids) -> dict:
    """Logits and perplexity of the QLoRA model exactly as trained (4-bit base + adapter)."""
    from peft import PeftModel

    base = load_quantized(recipe, base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    out = {"logits": logits(model, compare_ids), "ppl": perplexity(model, ppl_ids)}
    del model, base
    gc.collect()
    return out


def pick_target(measured: dict, setting: str) -> str:
    """The recipe's merge target, or for `auto` the one whose merged model has the lower held-out perplexity."""
    if setting != "auto":
        return setting
    return min(measured, key=lambda t: measured[t]["ppl"])
