"""What a run of a recipe produces: which stages apply, which repos it publishes, which files they hold and how
the files are named. The one answer that plan, the stages' not_applicable checks, the cards and publish all read.

    from hubforge import products
    products.planned_repos(recipe)              # {kind: repo id}, from the recipe alone (plan, preflight)
    products.produced_repos(recipe, manifest)   # {kind: repo id} of what the run directory holds (cards)
    products.skip_reason("gguf", recipe)        # why a stage has nothing to do for this recipe, or None

Pure and light (no torch, no Hub): `hubforge plan` imports it in CI's slim environment.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hubforge.errors import StageError


@dataclass(frozen=True)
class Kind:
    """One kind of repo a run publishes, and how its card describes it."""
    name: str
    label: str                          # how other cards link to it
    library: str | None                 # card metadata `library_name`
    relation: str | None                # card metadata `base_model_relation` (a folded LoRA is a fine-tune)
    measured_on: tuple[str, ...]        # evaluated models whose numbers count as this card's own
    template: str                       # cards/templates/<template>


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("adapter", "Adapter (PEFT)", "peft", "adapter", ("adapter",), "adapter.md.j2"),
    Kind("merged", "Merged model (transformers)", "transformers", "finetune", ("merged", "full"), "merged.md.j2"),
    Kind("gguf", "GGUF (llama.cpp, Ollama)", "gguf", "quantized", ("merged", "full"), "gguf.md.j2"),
    Kind("space", "Demo (Gradio Space)", None, None, (), "space-readme.md.j2"),
)}
MODEL_KINDS = ("adapter", "merged", "gguf")  # the model repos, in publishing order

# Nominal bits per weight of llama.cpp types (mixed K-quants are averages over a typical model): plan's disk
# estimate and the gguf stage's disk check.
GGUF_BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q5_0": 5.5,
             "Q5_1": 6.0, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q4_1": 5.0, "Q3_K_L": 4.27, "Q3_K_M": 3.91,
             "Q3_K_S": 3.5, "Q2_K": 3.35, "IQ4_NL": 4.5, "TQ1_0": 1.69, "TQ2_0": 2.06,
             "AUTO": 8.5}  # AUTO: at most its Q8_0 reference


def checkpoints_kept(recipe, steps: int | None) -> int:
    """How many checkpoint folders a train run holds at once: the Trainer saves every train.save_steps and at the
    last step, and keeps train.save_total_limit of them (all of them when the step count is not known)."""
    limit = recipe.train.save_total_limit
    return limit if not steps else min(limit, -(-steps // recipe.train.save_steps))


def checkpoint_bytes(is_adapter: bool, total: int, trainable: int) -> int:
    """One checkpoint on disk: the saved weights (a full fine-tune saves the whole model, an adapter only its own
    weights; fp32, the widest a run saves) and the optimizer's two fp32 moments per trainable weight."""
    return (trainable if is_adapter else total) * 4 + trainable * 8


def train_result_bytes(is_adapter: bool, total: int, trainable: int) -> int:
    """What the train stage keeps after the checkpoints: the adapter, or the whole fine-tuned model (fp32)."""
    return (trainable if is_adapter else total) * 4


def repo_ids(recipe) -> dict[str, str]:
    return {"adapter": recipe.publish.adapter_repo, "merged": recipe.publish.merged_repo, "gguf": recipe.publish.gguf_repo}


def skip_reason(stage: str, recipe) -> str | None:
    """Why `stage` has nothing to do for this recipe (its not_applicable reason), or None when it applies."""
    reason = {"merge": merge_skip_reason, "gguf": gguf_skip_reason, "space": space_skip_reason}.get(stage)
    return reason(recipe) if reason else None


# One function per stage, so that each reads only the recipe sections its stage declares (tests/test_layers.py).
def merge_skip_reason(recipe) -> str | None:
    m = recipe.method
    if not m.is_mergeable:
        return (f"{m.name} learns virtual tokens, not weight deltas: nothing to merge, so there is no merged model "
                "and no GGUF")
    return None if recipe.export.merge else "export.merge is false"


def gguf_skip_reason(recipe) -> str | None:
    if not recipe.export.gguf.enabled:
        return "export.gguf.enabled is false"
    merge = merge_skip_reason(recipe)
    return f"nothing was merged: {merge}" if merge else None


def space_skip_reason(recipe) -> str | None:
    return None if recipe.space.enabled else "space.enabled is false"


def applies(stage: str, recipe) -> bool:
    return skip_reason(stage, recipe) is None


def planned_repos(recipe) -> dict[str, str]:
    """kind -> repo id this recipe will publish (known before any stage runs: plan, preflight)."""
    wanted = {"adapter": recipe.method.is_adapter, "merged": merge_skip_reason(recipe) is None,
              "gguf": gguf_skip_reason(recipe) is None}
    return {kind: repo for kind, repo in repo_ids(recipe).items() if wanted[kind]}


def produced_repos(recipe, manifest: dict) -> dict[str, str]:
    """kind -> repo id of the repos this run produced (what the manifest says exists), plus the Space."""
    stages = manifest.get("stages", {})
    result = {name: stages.get(name, {}).get("result") or {} for name in ("train", "merge", "gguf")}
    out = {}
    if recipe.method.is_adapter and result["train"].get("adapter_dir"):
        out["adapter"] = recipe.publish.adapter_repo
    if result["merge"].get("model_dir"):
        out["merged"] = recipe.publish.merged_repo
    if result["gguf"].get("files"):
        out["gguf"] = recipe.publish.gguf_repo
    if recipe.space.enabled:
        out["space"] = recipe.space.id
    return out


# ---------------------------------------------------------------- files
def gguf_name(recipe, qtype: str) -> str:
    """`<name>-<TYPE>.gguf`: every GGUF file of a run (the LoRA adapter's type is `LoRA-F16`)."""
    return f"{recipe.name}-{qtype}.gguf"


LORA_GGUF_TYPE = "LoRA-F16"


AUTO_GGUF_TYPE = "AUTO"  # the KL-budgeted per-tensor mixture (export.gguf.auto)


# Types whose rounding takes no importance data (ggml's quantize_q8_0 has no weights argument): a run whose quants
# are only these makes no matrix (stand-in runs export F16 + Q8_0).
IGNORE_IMATRIX = frozenset({"Q8_0"})


def uses_imatrix(recipe) -> bool:
    """Whether the gguf stage computes (and the GGUF repo gets) an importance matrix."""
    cfg = recipe.export.gguf
    return cfg.imatrix.enabled and bool(cfg.auto.enabled or set(cfg.quants) - IGNORE_IMATRIX)


def imatrix_name(recipe) -> str:
    """`<name>.imatrix`: the importance matrix (llama.cpp's GGUF imatrix format; not named .gguf, so model pickers
    that list a repo's .gguf files do not offer it as a model)."""
    return f"{recipe.name}.imatrix"


def gguf_types(recipe) -> list[str]:
    """The model types the gguf stage writes: the full-precision file, each quant, then the AUTO mixture (only
    published when its measurement meets the budget)."""
    auto = [AUTO_GGUF_TYPE] if recipe.export.gguf.auto.enabled else []
    return [recipe.export.gguf.outtype] + list(recipe.export.gguf.quants) + auto


def gguf_files(recipe) -> list[str]:
    """The GGUF files a run of this recipe writes (none when the gguf stage does not apply)."""
    if gguf_skip_reason(recipe) is not None:
        return []
    files = [gguf_name(recipe, t) for t in gguf_types(recipe)]
    files += [imatrix_name(recipe)] if uses_imatrix(recipe) else []
    return files + ([gguf_name(recipe, LORA_GGUF_TYPE)] if recipe.export.gguf.lora else [])


def folder_files(run_dir, rel: str) -> list[tuple[str, Path]]:
    """(path in repo, local file) of a run-directory folder, without hidden files or a library-written README."""
    folder = run_dir.path / rel
    if not folder.is_dir():
        raise StageError(f"{folder} does not exist; run the stage that writes it again")
    # A library-written README (PEFT's auto card) is replaced by the validated card.
    return [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != "README.md"
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def repo_contents(recipe, run_dir) -> dict[str, list[tuple[str, Path]]]:
    """kind -> [(path in repo, local file)] of each model repo, from the run directory (cards not included)."""
    train, merge, gguf = run_dir.result("train"), run_dir.result("merge"), run_dir.result("gguf")
    out: dict[str, list[tuple[str, Path]]] = {}
    if recipe.method.is_adapter:
        out["adapter"] = folder_files(run_dir, train.get("adapter_dir") or "train/adapter")
        if (run_dir.path / "train/tokenizer").is_dir():  # the tokenizer + chat template the adapter was trained with
            out["adapter"] += folder_files(run_dir, "train/tokenizer")
    if run_dir.stage("merge")["status"] == "done":
        out["merged"] = folder_files(run_dir, merge.get("model_dir") or "merge/model")
    if run_dir.stage("gguf")["status"] == "done":
        # a split file is published as its parts (llama.cpp loads the set from the first)
        rels = [p["file"] for f in gguf.get("files") or [] for p in f.get("parts") or [f]]
        rels += [(gguf.get("lora_gguf") or {}).get("file")] + ([gguf["quality"]] if gguf.get("quality") else [])
        rels += [(gguf.get("imatrix") or {}).get("file")]  # the importance matrix the quants were made with
        rels += (gguf.get("ollama") or {}).get("files") or []  # Ollama's `template` and `params`
        out["gguf"] = [(Path(r).name, run_dir.path / r) for r in rels if r]
    return out
