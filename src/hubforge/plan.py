"""What a run of a recipe would do, and what it would cost, computed offline.

    hubforge plan recipes/gemma-3-270m/persian-chat-lora.yaml --format markdown

The markdown form is the comment CI posts on a recipe pull request. Parameter counts come from the base's
config (the local checkpoint when it is on disk, else `base.KNOWN_BASES`); memory is an estimate per GPU
(weights + trainable state + activations + loss head) with the formula's parts shown, not a measurement, for the
recipe's own `compute` section and for each strategy of hubforge.compute, with the smallest set-up that fits
each common GPU size; training time on named GPU classes comes from hubforge.gpus (FLOPs / assumed utilisation),
for the tokens of local data, or of a Hub dataset that hubforge.hubdata knows (card rows × a stand-in's tokens per row).
"""
from __future__ import annotations

import json

from hubforge import chat, compute, gpus, hubdata, products
from hubforge.base import KNOWN_BASES, embedded_dir
from hubforge.datarows import read_rows
from hubforge.pipeline import STAGES
from hubforge.recipe import Recipe

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}


def architecture(recipe: Recipe) -> dict | None:
    """Config dimensions of the base: from a local config.json when present, else the known-bases table."""
    model = recipe.base.model
    config_path = None
    if model.startswith("embedded:"):
        config_path = embedded_dir() / "config.json"
    elif model.startswith((".", "/")):
        config_path = recipe.local_path(model) / "config.json"
    if config_path is not None and config_path.is_file():
        c = json.loads(config_path.read_text("utf-8"))
        c = c.get("text_config", c)
        heads = c["num_attention_heads"]
        return {"vocab": c["vocab_size"], "hidden": c["hidden_size"], "layers": c["num_hidden_layers"],
                "intermediate": c["intermediate_size"], "heads": heads, "kv_heads": c.get("num_key_value_heads", heads),
                "head_dim": c.get("head_dim") or c["hidden_size"] // heads, "tied": c.get("tie_word_embeddings", True),
                "source": str(config_path)}
    facts = KNOWN_BASES.get(model)
    return dict(facts, source="hubforge.base.KNOWN_BASES") if facts else None


def module_shapes(a: dict) -> dict[str, tuple[int, int]]:
    q, kv = a["heads"] * a["head_dim"], a["kv_heads"] * a["head_dim"]
    h, i = a["hidden"], a["intermediate"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_counts(recipe: Recipe, a: dict) -> dict:
    shapes = module_shapes(a)
    per_layer = sum(i * o for i, o in shapes.values())
    embed = a["vocab"] * a["hidden"]
    total = a.get("params") or (embed + a["layers"] * per_layer + (0 if a["tied"] else embed) + a.get("extra_params", 0))
    m = recipe.method
    if m.lora:
        trainable = a["layers"] * sum(m.lora.r * (shapes[t][0] + shapes[t][1]) for t in m.lora.target_modules if t in shapes)
    elif m.prompt_tuning:
        trainable = m.prompt_tuning.num_virtual_tokens * a["hidden"]
    elif m.p_tuning:
        h, e = a["hidden"], m.p_tuning.encoder_hidden_size
        trainable = m.p_tuning.num_virtual_tokens * h + (h * e + e * e + e * h + 2 * e + h)
    elif m.full and m.full.trainable_modules:
        mods = set(m.full.trainable_modules)
        trainable = (embed if "embed_tokens" in mods else 0) + (embed if "lm_head" in mods and not a["tied"] else 0)
        trainable += a["layers"] * sum(i * o for name, (i, o) in shapes.items() if name in mods)
    else:
        trainable = total
    return {"total": int(total), "trainable": int(trainable), "trainable_pct": round(100 * trainable / total, 3)}


# Checked against published figures (tests/test_plan.py holds the estimates inside these bounds):
#   Gemma 3 12B-it QLoRA (recipes/gemma-3-12b-it/turkish-alpaca-qlora.yaml: r 32, batch 2 x 4,096 tokens, gradient
#   checkpointing, paged 8-bit AdamW) estimates ≈ 14 GiB. Floor: Unsloth's requirements page lists 7.5 GB (11B) and
#   8.5 GB (14B) as the absolute minimum for QLoRA with its own kernels at small batches. Ceiling: a single 24 GB
#   GPU, the target of Kaitchup's "Fine-Tuning Gemma 3 on Your Computer with LoRA and QLoRA" (and of this recipe's
#   header). In between: the QLoRA paper (Dettmers et al. 2023) fits 65B in 48 GB, ~0.74 GB per billion parameters,
#   ≈ 9 GB for 12B; LLaMA-Factory's hardware table gives 12 GB for 13B QLoRA (both at their own, shorter batches).
#   Llama 3.1 8B QLoRA (recipes/llama-3.1-8b/persian-qa-qlora.yaml, batch 1 x 2,048) estimates ≈ 7.6 GiB against
#   Unsloth's 6 GB minimum for 8B and Schmid's single-L4 (24 GB) Llama 3.1 8B QLoRA runs at batch 4 x 1,024.
def memory_estimate(recipe: Recipe, a: dict, params: dict, strategy: str | None = None, processes: int | None = None) -> dict:
    """GiB per GPU, for the recipe's compute section or the given strategy and process count; parts shown so a
    reviewer can check the arithmetic. Sharding strategies divide weights and/or trainable state (gradients,
    optimizer) by the processes (compute.SHARDING); activations and the loss head are per GPU's own micro-batch."""
    n = processes or recipe.compute.processes
    strategy = strategy or (recipe.compute.strategy if n > 1 else "single")
    shard_weights, shard_state = compute.SHARDING[strategy]
    t, m = recipe.train, recipe.method
    act_bytes = DTYPE_BYTES[t.precision]
    embed = a["vocab"] * a["hidden"]
    if m.name == "qlora":  # bitsandbytes keeps embeddings and lm_head in 16-bit; NF4 + double-quant ≈ 4.13 bits
        kept = embed * (1 if a["tied"] else 2)
        weights = kept * 2 + (params["total"] - kept) * 4.13 / 8
    else:
        weights = params["total"] * DTYPE_BYTES[recipe.base.dtype if t.precision == "fp32" else t.precision]
    optimizer_state = 2 if "8bit" in t.optimizer else 8
    trainable_state = params["trainable"] * (4 + 4 + optimizer_state)
    tokens = t.batch_size * t.max_length
    per_layer = tokens * a["hidden"] * (2 if t.gradient_checkpointing else 34) * act_bytes / 2
    activations = a["layers"] * per_layer + (tokens * a["hidden"] * 34 * act_bytes / 2 if t.gradient_checkpointing else 0)
    gib = lambda b: round(b / 2**30, 2)  # noqa: E731
    weights, trainable_state = weights / (n if shard_weights else 1), trainable_state / (n if shard_state else 1)
    parts = {"weights": gib(weights), "trainable_state": gib(trainable_state), "activations": gib(activations),
             "loss_head": gib(loss_head_bytes(recipe, a, tokens, act_bytes))}
    return {"total_gib": round(sum(parts.values()) * 1.1, 2), "parts_gib": parts, "overhead": "x1.1 for allocator/workspace",
            "strategy": strategy, "processes": n}


# TRL 1.16's SFTTrainer always computes the loss through its fused LM head (trl/trainer/utils.py add_fused_lm_head,
# trl/kernels/chunked_logprob.py): the (tokens, vocab) logits are never materialised. It projects 4,096 tokens x
# 32,768 vocabulary entries at a time into one reused tile (forward, then again in backward), keeps a few fp32
# numbers per token, and accumulates the gradient of the hidden states (and of the LM head when it is trained) in
# fp32. The train stage sets nothing that turns it off (no label smoothing, no compute_loss_func, no Liger loss).
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768


def loss_head_bytes(recipe: Recipe, a: dict, tokens: int, act_bytes: int) -> float:
    """Peak bytes of TRL's chunked loss head for one micro-batch of `tokens` (all of them scored: an upper bound,
    since on CUDA only the positions that carry loss are projected)."""
    tile = min(tokens, TRL_TOKEN_CHUNK) * min(a["vocab"], TRL_VOCAB_CHUNK) * act_bytes
    per_token = tokens * (a["hidden"] * (act_bytes + 4) + 8 * 4)  # compacted hidden copy + its fp32 grad; statistics
    m = recipe.method
    mods = set(m.full.trainable_modules) if m.full else set()
    head_trained = m.name == "full" and (not mods or "lm_head" in mods or (a["tied"] and "embed_tokens" in mods))
    return tile + per_token + (a["vocab"] * a["hidden"] * 4 if head_trained else 0)


GPU_SIZES_GIB = (24, 48, 80)


def strategy_estimates(recipe: Recipe, a: dict, params: dict) -> dict:
    """Per-GPU GiB of each strategy at the recipe's process count (2 when it asks for one), and for each common GPU
    size the smallest set-up that fits: one GPU, else the fewest processes of a sharding strategy (fsdp first:
    it needs nothing beyond accelerate)."""
    n = max(recipe.compute.processes, 2)
    per = {s: memory_estimate(recipe, a, params, s, n)["total_gib"] for s in compute.STRATEGIES}
    fits = {}
    for size in GPU_SIZES_GIB:
        options = [("single", 1)] + [(s, k) for k in (2, 4, 8) for s in ("fsdp", "deepspeed_zero2", "deepspeed_zero3")]
        found = next(((s, k, e) for s, k in options if (e := memory_estimate(recipe, a, params, s, k)["total_gib"]) <= size), None)
        fits[f"{size}GiB"] = ({"strategy": found[0], "processes": found[1], "per_gpu_gib": found[2]} if found else None)
    return {"processes": n, "per_gpu_gib": per, "fits": fits}


def train_time(recipe: Recipe, a: dict, params: dict, tokens: dict, memory: dict) -> dict:
    """Estimated hours on each named GPU class (hubforge.gpus), for the recipe's own process count. The tokens to
    train: the counted local data or the estimate for a Hub dataset in hubforge.hubdata, else max_steps x batch x
    grad_accum x max_length x processes (exact when packed, else an upper bound); any other Hub dataset with only
    epochs leaves the total to the data stage, so the time of one optimizer step is given instead, with the reason."""
    t, n = recipe.train, recipe.compute.processes
    step_tokens = t.batch_size * t.grad_accum * t.max_length * n
    if tokens.get("tokens"):
        total, basis = tokens["tokens"], tokens["basis"]
    elif t.max_steps:
        total, basis = t.max_steps * step_tokens, f"{t.max_steps} steps × {step_tokens:,} tokens (upper bound unless packed)"
    else:
        total, basis = None, f"one optimizer step of ≤ {step_tokens:,} tokens; no total: {tokens['how']}"
    micro = t.batch_size * t.max_length
    if tokens.get("per_row") and not t.packing:  # unpacked rows: one micro-batch per batch_size rows, however short
        micro = min(micro, t.batch_size * tokens["per_row"])  # (QLoRA dequantizes its weights once per micro-batch)
        basis += "; padding to a batch's longest row not counted" if t.batch_size > 1 else ""
    m, ckpt = recipe.method, t.gradient_checkpointing
    flops = gpus.flops_per_token(a, params, m.name, t.max_length, ckpt, m.is_adapter)
    per_gpu = {gpu.name: gpus.on_gpu(gpu, precision=t.precision, need_gib=memory["total_gib"], tokens=total or step_tokens,
                                     micro_batch_tokens=micro, processes=n, flops=flops,
                                     params=params, checkpointing=ckpt) for gpu in gpus.GPUS}
    return {"tokens": total, "per": "run" if total else "step", "basis": basis, "processes": n, "mfu": gpus.MFU,
            "gflop_per_token": round(flops["total"] / 1e9, 2), "gpus": per_gpu}


def disk_estimate(recipe: Recipe, params: dict) -> dict:
    mb = lambda b: round(b / 1e6, 1)  # noqa: E731
    shape = (recipe.method.is_adapter, params["total"], params["trainable"])
    out = {"adapter_mb": mb(products.train_result_bytes(*shape)) if recipe.method.is_adapter else 0.0}
    out["checkpoints_mb"] = mb(products.checkpoint_bytes(*shape) * products.checkpoints_kept(recipe, recipe.train.max_steps))
    merged = products.applies("merge", recipe)
    out["merged_mb"] = mb(params["total"] * DTYPE_BYTES[recipe.export.merge_dtype]) if merged else 0.0
    out["gguf_mb"] = ({t: mb(params["total"] * products.GGUF_BITS[t] / 8) for t in products.gguf_types(recipe)}
                      if products.applies("gguf", recipe) else {})
    out["total_mb"] = round(out["adapter_mb"] + out["checkpoints_mb"] + out["merged_mb"] + sum(out["gguf_mb"].values()), 1)
    return out


def token_estimate(recipe: Recipe) -> dict:
    if not recipe.data.files:  # a Hub dataset: its card's row count x a stand-in sample's tokens per row, if known
        hub = hubdata.estimate(recipe)
        if hub["rows"] is None:
            return {"tokens": None, "how": hub["how"]}
        return _run_tokens(recipe, hub["rows"], hub["per_row"], hub["how"], skipped=[],
                           basis="the train tokens estimated above (dataset card rows × a stand-in sample's tokens per row)")
    rows, chars, skipped = 0, 0, []
    for rel in recipe.data.files:
        path = recipe.local_path(rel)
        if path.suffix.lower() == ".parquet":
            return {"tokens": None, "how": f"{rel}: token counts for {path.suffix} files come from the data stage"}
        file_rows, bad = read_rows(path, rel)  # the data stage's reader: same rows, same problems
        rows += len(file_rows)
        chars += sum(len(_text_of(r)) for r in file_rows)
        skipped += bad
    used = rows * (1 - recipe.data.eval_fraction) * recipe.data.fraction
    if recipe.data.max_samples:
        used = min(used, recipe.data.max_samples)
    per_row = chars / max(rows, 1) / 3.0  # ≈3 characters per token for Gemma's vocabulary on mixed Persian/English
    return _run_tokens(recipe, used, per_row, "characters / 3 (estimate; the data stage counts exactly)", skipped,
                       basis="the train tokens counted above")


def _run_tokens(recipe: Recipe, rows: float, per_row: float, how: str, skipped: list, basis: str) -> dict:
    """Tokens a run trains: train.max_steps optimizer steps when set (the Trainer stops there; a packed sequence is
    train.max_length tokens), else epochs × rows."""
    t = recipe.train
    if t.max_steps:
        sequences = t.max_steps * t.batch_size * t.grad_accum * recipe.compute.processes
        total = sequences * (t.max_length if t.packing else per_row)
    else:
        total = rows * per_row * t.epochs
    return {"tokens": int(total), "rows": int(rows), "per_row": round(per_row, 1), "how": how, "skipped": skipped,
            "basis": basis}


def _text_of(row) -> str:
    if isinstance(row, dict):
        return " ".join(_text_of(v) for v in row.values())
    if isinstance(row, list):
        return " ".join(_text_of(v) for v in row)
    return str(row)


def build_plan(recipe: Recipe) -> dict:
    a = architecture(recipe)
    params = parameter_counts(recipe, a) if a else None
    memory, tokens = (memory_estimate(recipe, a, params) if a else None), token_estimate(recipe)
    m = recipe.method
    planned = products.planned_repos(recipe)
    return {
        "recipe": {"name": recipe.name, "source": recipe.source, "sha256": recipe.sha256},
        "base": {"model": recipe.base.model, "revision": recipe.base.revision,
                 "license": recipe.base.license or (KNOWN_BASES.get(recipe.base.model) or {}).get("license")},
        "data": {"source": recipe.data.hub or list(recipe.data.files), "revision": recipe.data.revision, "format": recipe.data.format},
        "method": {"name": m.name, **{k: v for k, v in _section(m).items() if k != "name"}},
        "stages": [{"name": s.name, "applies": products.applies(s.name, recipe), "summary": s.summary} for s in STAGES],
        "repos": {kind: planned.get(kind) for kind in products.MODEL_KINDS},
        "space": recipe.space.id if recipe.space.enabled else None,
        "gguf_files": products.gguf_files(recipe),
        "warnings": warnings(recipe),
        "problems": problems(recipe),
        "estimates": {
            "architecture_source": a["source"] if a else None,
            "parameters": params,
            "gpu_memory": memory,
            "strategies": strategy_estimates(recipe, a, params) if a else None,
            "disk": disk_estimate(recipe, params) if params else None,
            "train_tokens": tokens,
            "train_time": train_time(recipe, a, params, tokens, memory) if a else None,
        },
    }


def problems(recipe: Recipe) -> list[str]:
    """Things that would make the run fail (the pipeline's preflight refuses them too); `hubforge plan` exits 1."""
    if not chat.trl_installed():  # the slim pull-request job: warnings() says the check was left to the preflight
        return []
    return [p for p in [chat.recipe_template_problem(recipe)] if p]


def warnings(recipe: Recipe) -> list[str]:
    """Things a reviewer should see before approving; none of them stops a run."""
    out = []
    if recipe.train.assistant_only_loss and recipe.data.format != "text" and not chat.trl_installed():
        out.append("base.chat_template was not checked for assistant-only training here (TRL is not installed); the "
                   "pipeline's preflight checks it before training starts")
    for what, rev, used in (("base.revision", recipe.base.revision, not recipe.base.model.startswith(("embedded:", ".", "/"))),
                            ("data.revision", recipe.data.revision, bool(recipe.data.hub))):
        if used and not (rev and len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)):
            out.append(f"{what} is {rev or 'unset'!r}, not a 40-hex commit: the run is reproducible only while that branch does not move")
    if recipe.method.name == "qlora":
        out.append("qlora needs bitsandbytes 4-bit kernels (CUDA runner recommended; CPU works but is slow)")
    if storage := compute.quant_storage(recipe):
        out.append(f"qlora under fsdp: the 4-bit weights are stored as {storage} (bnb_4bit_quant_storage = "
                   "method.quantization.compute_dtype) so FSDP can shard them; base.dtype must be the same (the train stage refuses otherwise)")
    if compute.launches(recipe) and recipe.compute.strategy.startswith("deepspeed"):
        out.append(f"compute.strategy {recipe.compute.strategy} needs DeepSpeed on the training machine (pip install deepspeed); "
                   "hubforge does not install it")
    return out


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _section(obj) -> dict:
    from hubforge.recipe import _plain

    return {k: v for k, v in _plain(obj).items() if v is not None}


def render(plan: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(plan, indent=2, ensure_ascii=False)
    est, p = plan["estimates"], plan["estimates"]["parameters"]
    mem, disk, tok = est["gpu_memory"], est["disk"], est["train_tokens"]
    method = ", ".join(f"{k}={_short(v)}" for section, values in plan["method"].items() if section != "name"
                       for k, v in values.items() if v not in (None, [], ""))
    rows = [
        ("Recipe", f"{plan['recipe']['name']} (`{plan['recipe']['source']}`, sha256 {plan['recipe']['sha256'][:12]})"),
        ("Base", f"{plan['base']['model']}" + (f" @ {plan['base']['revision']}" if plan["base"]["revision"] else "") + f" — licence {plan['base']['license'] or 'unknown'}"),
        ("Data", f"{plan['data']['source']} ({plan['data']['format']})" + (f" @ {plan['data']['revision']}" if plan["data"]["revision"] else "")),
        ("Method", f"{plan['method']['name']}: {method}"),
        ("Stages", " → ".join(s["name"] if s["applies"] else f"~~{s['name']}~~ (n/a)" for s in plan["stages"])),
        ("Adapter repo", plan["repos"]["adapter"] or "—"),
        ("Merged repo", plan["repos"]["merged"] or "—"),
        ("GGUF repo", plan["repos"]["gguf"] or "—"),
        ("GGUF files", ", ".join(plan["gguf_files"]) or "—"),
        ("Space", plan["space"] or "—"),
        ("Parameters", f"{p['total']:,} total, {p['trainable']:,} trainable ({p['trainable_pct']} %)" if p else "unknown base architecture"),
        ("GPU memory (est.)", f"≈ {mem['total_gib']} GiB = " + " + ".join(f"{k} {v}" for k, v in mem["parts_gib"].items()) + " GiB, ×1.1"
         + (f" per GPU ({mem['processes']} processes, {mem['strategy']})" if mem["processes"] > 1 else "") if mem else "—"),
        *([("Per GPU by strategy", _strategies(est["strategies"])), ("Fits on", _fits(est["strategies"]))] if est.get("strategies") else []),
        ("Disk (est.)", f"≈ {disk['total_mb']:,} MB (adapter {disk['adapter_mb']}, checkpoints {disk['checkpoints_mb']}, merged {disk['merged_mb']}, GGUF {sum(disk['gguf_mb'].values()):.1f})" if disk else "—"),
        ("Train tokens", f"≈ {tok['tokens']:,} over {tok['rows']:,} rows ({tok['how']})" if tok.get("tokens") else tok["how"]),
        *([("Train time (est.)", _times(tt)), ("Time model", _time_model(tt))] if (tt := est.get("train_time")) else []),
    ]
    rows += [("Warning", w) for w in plan["warnings"]] + [("PROBLEM", p) for p in plan["problems"]]
    if skipped := tok.get("skipped"):
        rows += [("Skipped rows", f"{len(skipped)} records the data stage will skip: " + "; ".join(skipped[:5])
                  + (f"; … {len(skipped) - 5} more" if len(skipped) > 5 else ""))]
    if fmt == "markdown":
        lines = [f"### hubforge plan: `{plan['recipe']['name']}`", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        return "\n".join(lines) + "\n"
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v.replace('~~', '')}" for k, v in rows) + "\n"


def _strategies(s: dict) -> str:
    return f"with {s['processes']} processes: " + ", ".join(f"{k} {v} GiB" for k, v in s["per_gpu_gib"].items())


def _fits(s: dict) -> str:
    def one(fit):
        if fit is None:
            return "no (activations + loss head alone exceed it: lower train.batch_size or max_length)"
        if fit["processes"] == 1:
            return f"1 GPU (≈ {fit['per_gpu_gib']} GiB)"
        return f"{fit['strategy']} × {fit['processes']} (≈ {fit['per_gpu_gib']} GiB each)"
    return "; ".join(f"{size.replace('GiB', ' GiB')}: {one(fit)}" for size, fit in s["fits"].items())


def _times(tt: dict) -> str:
    def one(r):
        if not r["fits"]:
            return r["why"]
        return f"≈ {gpus.duration(r['seconds'])}" + ("/step" if tt["per"] == "step" else "")
    where = f"{tt['processes']} × " if tt["processes"] > 1 else ""
    return "; ".join(f"{where}{name}: {one(r)}" for name, r in tt["gpus"].items())


def _time_model(tt: dict) -> str:
    return (f"{tt['gflop_per_token']:.1f} GFLOP per token (hubforge.gpus.flops_per_token) at {tt['mfu'] * 100:.0f} % of "
            f"each GPU's dense peak; tokens: {tt['basis']}")


def plan_text(recipe: Recipe, fmt: str = "text") -> str:
    return render(build_plan(recipe), fmt)
