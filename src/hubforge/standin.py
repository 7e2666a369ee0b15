"""Stand-in runs: any recipe, run on this machine without editing it, on the embedded base and a shipped sample.

    hubforge run recipes/llama-3.1-8b/persian-qa-qlora.yaml --standin

`overrides(raw)` turns a raw recipe into the `--set`/`--unset` lists a stand-in run applies on top of the YAML
(the user's own `--set`/`--unset` still come after): the base becomes `embedded:gemma-3-270m`; the Hub dataset
becomes a shipped sample of the same format and columns under `recipes/data/standin/`; steps, lengths and eval rows
shrink; GGUF export keeps F16 + one quant; lm-eval tasks map to local stand-in tasks of the same shape (the real
benchmarks are unreachable offline). Everything else — method, its hyper-parameters, quantization (QLoRA keeps
bitsandbytes 4-bit, on CPU too), chat template, data handling (system prompt, fraction, packing), eval kind — stays
as the recipe says, so the code paths are the recipe's own. The list of changes is recorded in the resolved recipe
(`standin:`), and a recipe carrying it is never published (CLI and pipeline preflight refuse).
"""
from __future__ import annotations

BASE = "embedded:gemma-3-270m"
FOLDER = "recipes/data/standin"
# The Hub dataset a recipe names -> a shipped sample with the same format and columns (README in FOLDER).
SAMPLES = {
    "databricks/databricks-dolly-15k": "dolly.jsonl",
    "miladmim/slim-orca-dedup-chat-50k-persian": "persian-slimorca.jsonl",
    "mshojaei77/persian-gk": "persian-slimorca.jsonl",  # messages too: user/assistant turns, Persian
    "SajjadAyoubi/persian_qa": "persian-qa.jsonl",
    "malhajar/alpaca-gpt4-tr": "turkish-alpaca.jsonl",
}
# A dataset not in SAMPLES: the sample of its format (alpaca: Dolly's columns, remapped by the recipe's data.columns
# only when they match; otherwise name one in SAMPLES).
BY_FORMAT = {"messages": "persian-slimorca.jsonl", "squad": "persian-qa.jsonl", "alpaca": "turkish-alpaca.jsonl"}
# lm-eval task -> the local stand-in task of the same output type and document shape (TASK_FOLDER).
TASKS = {"mmlu": "standin_mmlu", "hellaswag": "standin_hellaswag"}
TASK_FOLDER = "recipes/data/standin/lm_tasks"  # data, not recipes: find_recipes and `changed` skip recipes/data/
SHRINK = {"train.max_steps": 2, "train.batch_size": 2, "train.grad_accum": 1, "train.save_steps": 2,
          "eval.max_samples": 4, "eval.batch_size": 4, "eval.lm_eval.limit": 4}
CAPS = {"train.max_length": 256, "eval.max_new_tokens": 16, "eval.lm_eval.num_fewshot": 2}
QUANT = "Q8_0"


class StandinError(ValueError):
    pass


def _get(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def sample_for(raw: dict) -> str:
    data = raw.get("data") or {}
    if data.get("files"):
        return ""  # local files already: the recipe's own data stays
    name = SAMPLES.get(data.get("hub")) or BY_FORMAT.get(data.get("format", "messages"))
    if not name:
        raise StandinError(f"data.format {data.get('format')!r}: no stand-in sample for this format under {FOLDER}; "
                           "run with --set data.files=[...] --unset data.hub instead")
    if data.get("columns") and name != "dolly.jsonl" and data.get("hub") not in SAMPLES:
        raise StandinError(f"data.columns {data['columns']} remaps the columns of {data.get('hub')}, which has no "
                           f"stand-in sample; add one to hubforge.standin.SAMPLES")
    return f"{FOLDER}/{name}"


def overrides(raw: dict) -> tuple[list[str], list[str]]:
    """(--set list, --unset list) that make `raw` a stand-in run; only keys present are unset."""
    import json

    sets = [f"base.model={BASE}"]
    unset = [k for k in ("base.revision", "base.license") if _get(raw, k) is not None]
    if sample := sample_for(raw):
        sets.append(f"data.files={json.dumps([sample])}")
        unset += [k for k in ("data.hub", "data.revision", "data.subset", "data.eval_split", "data.max_samples")
                  if _get(raw, k) is not None]
    sets += [f"{k}={v}" for k, v in SHRINK.items()]
    sets += [f"{k}={min(v, _get(raw, k)) if isinstance(_get(raw, k), int) else v}" for k, v in CAPS.items()]
    unset += [k for k in ("train.eval_steps",) if _get(raw, k) is not None]
    if (_get(raw, "eval.lm_eval") or {}).get("tasks"):
        tasks = list(raw["eval"]["lm_eval"]["tasks"])
        mapped = list(dict.fromkeys(TASKS.get(t) or TASKS.get(t.split("_", 1)[0]) or t for t in tasks))  # mmlu_* too
        if missing := [t for t in tasks if t.split("_", 1)[0] not in TASKS and t not in TASKS]:
            raise StandinError(f"eval.lm_eval.tasks: no stand-in task for {', '.join(missing)} (stand-ins exist for "
                               f"{', '.join(TASKS)}); add one under {TASK_FOLDER} or --set eval.lm_eval.tasks=[]")
        sets += [f"eval.lm_eval.tasks={json.dumps(mapped)}",
                 f"eval.lm_eval.include_path={TASK_FOLDER}"]
    sets += ["export.gguf.outtype=F16", f"export.gguf.quants=[{QUANT}]", f"space.gguf_file={QUANT}"]
    return sets, unset


def record(sets: list[str], unset: list[str]) -> list[str]:
    """What the resolved recipe's `standin:` holds: every change, in the order applied."""
    return [f"--set {s}" for s in sets] + [f"--unset {u}" for u in unset]
