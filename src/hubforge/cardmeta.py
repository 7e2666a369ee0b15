"""Card metadata from the resolved recipe, the run's manifest and the eval results: which repos a run produces,
the licence a derivative must carry, and the `ModelCardData` (with `EvalResult`s -> `model-index`) of each card.

    from hubforge.cardmeta import card_metadata, validate_metadata
    meta = card_metadata("adapter", recipe, run_dir.manifest, results)   # -> huggingface_hub.ModelCardData
    validate_metadata(meta.to_dict(), "adapter")                          # StageError naming the field

Pure functions (no network; the only file read is the schema and a local base's `hubforge-base.json`). The card
stage renders what these return; the Space README and the publish stage can reuse them.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jsonschema
from huggingface_hub import EvalResult, ModelCardData

from hubforge import products, scoring, shipped
from hubforge.errors import StageError

HUB_URL = "https://huggingface.co"
KINDS = products.MODEL_KINDS  # the model cards; each kind's library, relation and template: products.KINDS
METHOD_TAGS = {"lora": ("lora",), "qlora": ("qlora", "lora"), "prompt_tuning": ("prompt-tuning", "prompt_tuning"),
               "p_tuning": ("p-tuning", "p_tuning"), "full": ("full-finetune", "full")}
# Licences whose terms let a derivative be distributed under another licence (notices still kept).
PERMISSIVE = {"apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "isc", "cc0-1.0",
              "unlicense", "wtfpl", "zlib", "bsl-1.0", "postgresql", "ncsa", "afl-3.0", "cc-by-4.0", "cc-by-3.0",
              "cc-by-2.5", "cc-by-2.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "pddl", "odc-by", "ecl-2.0"}
# Model licences whose derivatives must carry the same terms, with the notice the terms require.
LICENSE_TERMS = {
    "gemma": {"title": "Gemma Terms of Use", "link": "https://ai.google.dev/gemma/terms",
              "policy": "https://ai.google.dev/gemma/prohibited_use_policy",
              "notice": "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"},
    "llama3.1": {"title": "Llama 3.1 Community License Agreement", "link": "https://www.llama.com/llama3_1/license/",
                 "policy": "https://www.llama.com/llama3_1/use-policy/", "name_prefix": "llama",
                 "notice": "Llama 3.1 is licensed under the Llama 3.1 Community License, "
                           "Copyright © Meta Platforms, Inc. All Rights Reserved.",
                 "attribution": "Built with Llama"},
    "llama3.2": {"title": "Llama 3.2 Community License Agreement", "link": "https://www.llama.com/llama3_2/license/",
                 "policy": "https://www.llama.com/llama3_2/use-policy/", "name_prefix": "llama",
                 "notice": "Llama 3.2 is licensed under the Llama 3.2 Community License, "
                           "Copyright © Meta Platforms, Inc. All Rights Reserved.",
                 "attribution": "Built with Llama"},
    "llama3.3": {"title": "Llama 3.3 Community License Agreement", "link": "https://www.llama.com/llama3_3/license/",
                 "policy": "https://www.llama.com/llama3_3/use-policy/", "name_prefix": "llama",
                 "notice": "Llama 3.3 is licensed under the Llama 3.3 Community License, "
                           "Copyright © Meta Platforms, Inc. All Rights Reserved.",
                 "attribution": "Built with Llama"},
}
# Where a metadata field comes from, so an error can name the recipe field to fix.
FIELD_SOURCES = {"license": "card.license / base.license", "language": "card.languages", "tags": "card.tags",
                 "base_model": "base.model", "datasets": "data.hub", "model-index": "evaluate/results.json"}


def cards_dir() -> Path:
    """The `cards/` folder (schema + templates), in a wheel or in the repository (hubforge.shipped)."""
    return shipped.folder("cards")


@lru_cache(maxsize=1)
def metadata_schema() -> dict:
    return json.loads((cards_dir() / "schema" / "card-metadata.schema.json").read_text("utf-8"))


# ---------------------------------------------------------------- base model and licence
def base_facts(recipe) -> dict:
    """{hub_id, license, note} of the base: the lead's KNOWN_BASES, a local base's hubforge-base.json, or the id itself."""
    from hubforge.base import KNOWN_BASES

    model = recipe.base.model
    facts = dict(KNOWN_BASES.get(model, {}))
    if model.startswith((".", "/")):
        marker = recipe.local_path(model) / "hubforge-base.json"
        facts.update(json.loads(marker.read_text("utf-8")) if marker.is_file() else {})
    elif not model.startswith("embedded:"):
        facts["hub_id"] = model
    if not facts.get("hub_id"):
        raise StageError(f"base.model {model!r}: a card must name the Hub id of the base model (metadata base_model), "
                         f"but this local folder has no hubforge-base.json with a \"hub_id\"; add one, or use a Hub id")
    return facts


def resolve_license(recipe, facts: dict) -> dict:
    """The licence the fine-tune carries: the base's, or a compatible one from card.license; a conflict is an error."""
    known, stated = facts.get("license"), recipe.base.license
    if known and stated and known != stated:
        raise StageError(f"base.license {stated!r} contradicts the known licence {known!r} of {facts['hub_id']}; "
                         f"remove base.license or correct it")
    base = stated or known
    if not base or base == "unknown":
        raise StageError(f"base.license: the licence of {facts['hub_id']} is not known to hubforge; set base.license "
                         f"to its Hub licence id (e.g. apache-2.0, gemma, llama3.1)")
    chosen = recipe.card.license or base
    if chosen != base and base not in PERMISSIVE:
        raise StageError(f"card.license {chosen!r} conflicts with the licence of the base model {facts['hub_id']} "
                         f"({base!r}): a derivative must be distributed under the same terms. Remove card.license "
                         f"(it is inherited) or set it to {base!r}")
    terms = LICENSE_TERMS.get(chosen)
    info = {"license": chosen, "base_license": base, "inherited": chosen == base, "terms": terms}
    if chosen == "other":
        info["license_name"], info["license_link"] = facts.get("license_name"), facts.get("license_link")
    return info


def check_names(recipe, repos: dict, licence: dict) -> None:
    """Naming rules of the licence (Llama 3.x: a derivative's name begins with "Llama") and honest method tags."""
    prefix = (licence["terms"] or {}).get("name_prefix")
    for kind, repo in repos.items():
        if prefix and kind != "space" and not repo.split("/")[-1].lower().startswith(prefix):
            raise StageError(f"publish.{kind}_repo {repo!r}: the {licence['terms']['title']} requires a derivative's name to begin "
                             f"with \"Llama\"; rename it (or change `name`, which the default repo names come from)")
    allowed = METHOD_TAGS[recipe.method.name]
    for i, tag in enumerate(recipe.card.tags):
        wrong = [m for m, tags in METHOD_TAGS.items() if tag.lower() in tags and tag.lower() not in allowed]
        if wrong:
            raise StageError(f"card.tags[{i}] {tag!r} names the {wrong[0]} method, but this model was trained with "
                             f"{recipe.method.name}; remove the tag (the card adds the method's own tag)")


repos = products.produced_repos  # kind -> repo id of what this run produced, plus the Space


# ---------------------------------------------------------------- eval results -> EvalResult
@lru_cache(maxsize=1)
def results_schema() -> dict:
    return json.loads(resources.files("hubforge").joinpath("schema/eval-results.schema.json").read_text("utf-8"))


def load_results(run_dir) -> dict:
    """evaluate/results.json of the run, checked against its schema; {} when the evaluate stage has not run."""
    path = run_dir.path / "evaluate" / "results.json"
    status = run_dir.stage("evaluate").get("status")
    if status != "done":  # not run: the cards say that no evaluation was recorded
        return {}
    if not path.is_file():
        raise StageError(f"the evaluate stage is done but {path} is missing; re-run it "
                         f"(hubforge run RECIPE --stages evaluate --force)")
    try:
        results = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON ({exc}); re-run the evaluate stage") from None
    check_results(results)
    return results


def check_results(results: dict) -> None:
    """evaluate/results.json must match the eval stage's schema; the first problem names its JSON path."""
    if not results:
        return
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(results_schema()).iter_errors(results))
    if err is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path) or "(top level)"
        raise StageError(f"evaluate/results.json{where}: {err.message}; re-run the evaluate stage")


def card_rows(kind: str, results: dict) -> list[dict]:
    """The summary rows a card reports: per (section, task, metric, split) the row measured on this card's own
    model, else on the model the eval stage compared (the merge stage verified they compute the same function).
    Each row gains `measured_on` (the model kind) and `own` (measured on this card's model)."""
    models = {key: m.get("kind") for key, m in (results.get("models") or {}).items()}
    prefer = products.KINDS[kind].measured_on
    groups: dict[tuple, list[dict]] = {}
    for row in results.get("summary") or []:
        groups.setdefault((row["section"], row["task"], row["metric"], row["split"]), []).append(row)
    chosen = []
    for rows in groups.values():
        ranked = sorted(rows, key=lambda r: (prefer.index(models.get(r["tuned_model"])) if models.get(r["tuned_model"]) in prefer
                                             else len(prefer) + (r["tuned_model"] != results.get("tuned"))))
        measured_on = models.get(ranked[0]["tuned_model"], ranked[0]["tuned_model"])
        chosen.append({**ranked[0], "measured_on": measured_on, "own": measured_on in prefer})
    return chosen


def metric_type(metric: str) -> str:
    """lm-eval writes `acc,none`; model-index wants an id like `acc`."""
    return re.sub(r"[^a-z0-9_.-]+", "_", metric.split(",")[0].lower()).strip("_") or "metric"


def held_out_dataset(recipe, results: dict, data_result: dict) -> dict:
    """The held-out rows as a model-index dataset: the same name/type/split/revision on every card of a run."""
    data = results.get("data") or {}
    source = data.get("source") or data_result.get("source") or {}
    held = scoring.split_name(recipe)  # as the evaluate stage names it
    name = recipe.data.hub or ", ".join(Path(f).name for f in recipe.data.files)
    return {"type": recipe.data.hub or "json", "name": f"{name} (held-out rows)", "split": data.get("split") or held,
            "revision": source.get("revision") or data.get("fingerprint") or data_result.get("fingerprint") or "unknown"}


def eval_dataset(row: dict, results: dict, recipe) -> dict:
    """model-index dataset of a summary row: the recipe's data for perplexity/QA, the lm-eval task otherwise."""
    if row["section"] == "lm_eval":
        task = ((results.get("lm_eval") or {}).get("tasks") or {}).get(row["task"]) or {}
        version = (results.get("lm_eval") or {}).get("lm_eval_version") or "?"
        return {"type": row["task"], "name": f"lm-eval task {row['task']}", "split": row["split"] or task.get("split") or "test",
                "revision": f"lm-eval {version}, task version {task.get('version', '?')}"}
    held_out = held_out_dataset(recipe, results, {})
    return {**held_out, "split": row["split"] or held_out["split"]}


def eval_results(kind: str, results: dict, recipe) -> list[EvalResult]:
    """One EvalResult per tuned number of this card, ordered as model-index groups them (task, dataset, split,
    revision), so that parsing the README back gives the same list in the same order."""
    out = []
    for row in card_rows(kind, results):
        value = row["tuned"]
        if value is None:
            continue  # a failed measurement: the card's table says so; model-index holds numbers only
        if isinstance(value, bool) or not math.isfinite(value):
            raise StageError(f"evaluate/results.json: summary {row['task']}/{row['metric']}: tuned is {value!r}, "
                             f"not a finite number; re-run the evaluate stage")
        ds = eval_dataset(row, results, recipe)
        task_type = "question-answering" if row["section"] == "qa" else "text-generation"
        shots = f", {row['shots']}-shot" if row["section"] == "lm_eval" else ""
        on = "" if row["own"] else f", measured on the {row['measured_on']} model"
        out.append(EvalResult(
            task_type=task_type, task_name=task_type.replace("-", " ").capitalize(), dataset_type=ds["type"],
            dataset_name=ds["name"], dataset_split=ds["split"], dataset_revision=ds["revision"],
            metric_type=metric_type(row["metric"]), metric_value=value,
            metric_name=f"{row['metric']} ({row['task']}{shots}{on})",
        ))
    order = list(dict.fromkeys(r.unique_identifier for r in out))
    return sorted(out, key=lambda r: order.index(r.unique_identifier))


def gguf_eval_results(recipe, manifest: dict, results: dict) -> list[EvalResult]:
    """The GGUF repo's own numbers: llama.cpp perplexity of each file on the held-out rows (metric config = type)."""
    stages = manifest.get("stages", {})
    files = (stages.get("gguf", {}).get("result") or {}).get("files") or []
    ds = held_out_dataset(recipe, results, stages.get("data", {}).get("result") or {})
    out = []
    for f in files:
        value = f.get("perplexity")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise StageError(f"gguf stage result: {f.get('file')}: perplexity is {value!r}, not a finite number; re-run gguf")
        out.append(EvalResult(
            task_type="text-generation", task_name="Text generation", dataset_type=ds["type"], dataset_name=ds["name"],
            dataset_split=ds["split"], dataset_revision=ds["revision"], metric_type="perplexity", metric_value=value,
            metric_name=f"Perplexity of {Path(f['file']).name} (llama.cpp)", metric_config=f["type"]))
    return out


# ---------------------------------------------------------------- metadata
def card_metadata(kind: str, recipe, manifest: dict, results: dict) -> ModelCardData:
    """The metadata of one card, through huggingface_hub's own types (model-index from EvalResult)."""
    facts = base_facts(recipe)
    licence = resolve_license(recipe, facts)
    produced = repos(recipe, manifest)
    check_names(recipe, produced, licence)
    # The GGUF files were converted from the merged model, so that is their base; the others derive from the base.
    base_model = produced.get("merged") if kind == "gguf" else facts["hub_id"]
    evals = gguf_eval_results(recipe, manifest, results) if kind == "gguf" else eval_results(kind, results, recipe)
    tags = list(dict.fromkeys(["hubforge", METHOD_TAGS[recipe.method.name][0], *recipe.card.tags,
                               *(["gguf", "llama.cpp"] if kind == "gguf" else [])]))
    return ModelCardData(
        license=licence["license"], license_name=licence.get("license_name"), license_link=licence.get("license_link"),
        language=list(recipe.card.languages) or None, base_model=base_model, base_model_relation=products.KINDS[kind].relation,
        datasets=[recipe.data.hub] if recipe.data.hub else None, tags=tags, pipeline_tag="text-generation",
        library_name=products.KINDS[kind].library, model_name=produced.get(kind) if evals else None, eval_results=evals or None,
    )


def schema_message(err, path: list) -> str:
    """A readable reason for one schema error (the field is named by the caller)."""
    top = str(path[0]) if path else ""
    if err.validator == "required":
        return "missing"
    if err.validator == "enum":
        hint = difflib.get_close_matches(str(err.instance), [str(v) for v in err.validator_value], n=1)
        what = "a Hub licence id" if top == "license" else f"one of {', '.join(map(str, err.validator_value))}"
        return f"{err.instance!r} is not {what}" + (f"; did you mean {hint[0]!r}?" if hint else "")
    if top == "language" and err.validator == "anyOf":
        return f"{err.instance!r} is not an ISO 639-1 (two-letter) or ISO 639-2/3 (three-letter) lower-case language code"
    if top in ("license_name", "license_link") and err.validator == "not":
        return "only allowed with license: other"
    if err.validator in ("pattern", "not"):
        hint = PATTERN_HINTS.get(top) or f"it must match {err.schema.get('pattern')!r}"
        return f"{err.instance!r} is not valid here: {hint}"
    if err.validator == "const":
        return f"{err.instance!r} is not allowed here; it must be {err.validator_value!r}"
    return f"{err.instance!r}: {err.message}" if not isinstance(err.instance, (dict, list)) else err.message


PATTERN_HINTS = {"base_model": "a Hub repo id (namespace/name), e.g. google/gemma-3-270m",
                 "datasets": "Hub dataset ids (namespace/name)", "tags": "tags are letters, digits and _ . : -",
                 "license_name": "a lower-case slug such as my-licence-1.0", "license_link": "an https:// URL or LICENSE",
                 "model-index": "model-index ids are lower-case (task type text-generation, metric type perplexity)"}


def metadata_problems(meta: dict) -> list[str]:
    """Every schema violation as `field: reason (from <recipe field>)`; unknown keys get a did-you-mean."""
    schema = metadata_schema()
    problems = []
    for err in sorted(jsonschema.Draft202012Validator(schema).iter_errors(meta), key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        if err.validator == "additionalProperties" and not path:
            for extra in [k for k in err.instance if k not in schema["properties"]]:
                hint = difflib.get_close_matches(str(extra), list(schema["properties"]), n=1)
                problems.append(f"{extra}: unknown key" + (f"; did you mean {hint[0]!r}?" if hint else ""))
            continue
        message = schema_message(err, path)
        if err.validator == "required":
            path.append(err.message.split("'")[1])
        field = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
        source = FIELD_SOURCES.get(str(path[0])) if path else None
        problems.append(f"{field or '(top level)'}: {message}" + (f" (from {source})" if source else ""))
    return problems


def validate_metadata(meta: dict, kind: str) -> None:
    """Raise StageError naming every bad field; also the kind's library_name (peft / transformers / gguf)."""
    problems = metadata_problems(meta)
    library = products.KINDS[kind].library
    if meta.get("library_name") != library:
        problems.append(f"library_name: {meta.get('library_name')!r} on the {kind} card; it must be {library!r}")
    if problems:
        raise StageError(f"{kind} card metadata is invalid:\n  " + "\n  ".join(problems))

