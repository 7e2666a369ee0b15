"""Data stage: load the dataset (Hub id pinned to a revision, or local files), convert rows to the training format,
hold out an eval split by seed, fit rows to train.max_length, write `data/train.jsonl` + `data/eval.jsonl`.

    hubforge run recipes/gemma-3-270m/persian-chat-lora.yaml --stages data

Nothing is dropped silently: skipped rows are counted by reason, too-long rows are counted as truncated or
dropped, and a dataset with no usable rows stops here, before any model is loaded. Token counts use the base
tokenizer and the chat template exactly as the train stage's SFTTrainer will (see hubforge.chat.token_ids).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path

from hubforge import chat, formats, hubclient
from hubforge.datarows import read_rows
from hubforge.errors import StageError
from hubforge.models import resolve_base
from hubforge.rundir import sha256_file


# The recipe sections this stage reads (part of its cache key; tests/test_layers.py checks it reads no other).
SECTIONS = ('base', 'data', 'train')
EXAMPLES = 5  # skipped records named on the console (and in the manifest); the rest are counted


def run(recipe, run_dir) -> dict:
    d, out = recipe.data, run_dir.stage_dir("data")
    # ---- load: raw rows of the training split (and the eval split when the dataset has one)
    if d.hub:
        raw_train, raw_eval, present, source = load_hub(d)
    else:
        raw_train, raw_eval, present, source = load_files(recipe)
    skipped = Counter()
    if invalid := source.pop("invalid_records", 0):
        skipped["invalid_record"] = invalid  # a JSON line that does not parse, or a record that is not an object
    examples = source.pop("invalid_examples", [])  # `file:line: what` of the first few
    mapping = formats.column_map(d.format, d.columns)
    if problem := formats.check_columns(d.format, mapping, present):
        raise StageError(problem)

    # ---- convert, skipping (and counting) unusable rows
    train_rows = convert_all(raw_train, recipe, mapping, skipped)
    eval_rows = convert_all(raw_eval, recipe, mapping, skipped) if raw_eval is not None else None
    if eval_rows is None:  # no eval split in the dataset: hold out a seeded share of the training rows
        train_rows, eval_rows = holdout(train_rows, d.eval_fraction, recipe.train.seed)
    train_rows = subsample(train_rows, d.fraction, d.max_samples, recipe.train.seed)
    if skipped:
        print(f"[data] skipped {sum(skipped.values())} rows: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if not train_rows:
        raise StageError(f"no usable training rows in {describe(source)}: skipped {dict(skipped) or 'nothing'}. "
                         f"Check data.format ({d.format!r}) and data.columns against the data.")

    # ---- fit to train.max_length with the base tokenizer + chat template (the tokenizer only, no model)
    tokenizer, template = load_tokenizer(recipe)
    lengths, counts = [], Counter()
    train_rows = fit_all(train_rows, tokenizer, template, recipe, counts, lengths)
    eval_rows = fit_all(eval_rows, tokenizer, template, recipe, counts, [])
    if not train_rows:
        raise StageError(f"every training row is longer than train.max_length={recipe.train.max_length} tokens "
                         f"({counts['dropped']} dropped); raise train.max_length or set data.too_long: truncate")
    if problem := chat.bos_problem(chat.token_ids(tokenizer, train_rows[0], template), tokenizer.bos_token_id):
        raise StageError(f"chat template {template.source}: {problem}")

    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "eval.jsonl", eval_rows)
    digest = hashlib.sha256((out / "train.jsonl").read_bytes() + b"\0" + (out / "eval.jsonl").read_bytes()).hexdigest()
    return {
        "rows_train": len(train_rows), "rows_eval": len(eval_rows), "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "truncated": counts["truncated"], "dropped_too_long": counts["dropped"], "fingerprint": digest,
        "source": source, "format": d.format, "chat_template": template.describe(),
        "tokens": {"train_total": sum(lengths), "train_max": max(lengths), "train_mean": round(sum(lengths) / len(lengths), 1)},
        "files": {"train": "data/train.jsonl", "eval": "data/eval.jsonl"},
    }


# ---------------------------------------------------------------- sources
def load_hub(d):
    """Rows of data.hub at data.revision, resolved to a commit first so the manifest pins what was read."""
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    endpoint = hubclient.endpoint()
    try:
        commit = HfApi(endpoint=endpoint).dataset_info(d.hub, revision=d.revision).sha
    except RevisionNotFoundError:
        raise StageError(f"data.revision {d.revision!r} does not exist in dataset {d.hub!r} on {endpoint}") from None
    except RepositoryNotFoundError:
        raise StageError(f"data.hub {d.hub!r} not found on {endpoint} (private? set HF_TOKEN)") from None
    except Exception as exc:  # offline, DNS, refused connection, offline mode: all mean "cannot reach the Hub"
        raise StageError(f"data.hub {d.hub!r} cannot be reached at {endpoint} ({type(exc).__name__}). Offline? Point "
                         "HF_ENDPOINT at a reachable Hub (e.g. the local one: `hubforge hub serve`), or use local "
                         "files: data.files: [path/to/data.jsonl]") from None
    try:
        train = datasets.load_dataset(d.hub, name=d.subset, split=d.split, revision=commit)
        evals = datasets.load_dataset(d.hub, name=d.subset, split=d.eval_split, revision=commit) if d.eval_split else None
    except ValueError as exc:  # unknown split or subset
        raise StageError(f"data.hub {d.hub!r}@{commit[:12]}: {exc}") from None
    source = {"hub": d.hub, "revision": commit, "requested_revision": d.revision, "subset": d.subset, "split": d.split,
              "eval_split": d.eval_split}
    return train.to_list(), evals.to_list() if evals is not None else None, list(train.column_names), source


def load_files(recipe):
    rows, invalid, present = [], [], {}
    for rel in recipe.data.files:
        file_rows, bad = read_rows(recipe.local_path(rel), rel)
        rows += file_rows
        invalid += bad
        present.update(dict.fromkeys(k for r in file_rows for k in r))
    source = {"files": [{"path": rel, "sha256": sha256_file(recipe.local_path(rel))} for rel in recipe.data.files],
              "invalid_records": len(invalid), "invalid_examples": invalid[:EXAMPLES]}
    for problem in invalid[:EXAMPLES]:
        print(f"[data] skipped {problem}")
    if len(invalid) > EXAMPLES:
        print(f"[data] ... and {len(invalid) - EXAMPLES} more records that are not JSON objects")
    if recipe.data.eval_split:
        raise StageError("data.eval_split names a split of a Hub dataset; local files have one split — remove it "
                         "(data.eval_fraction holds out rows instead)")
    return rows, None, list(present), source


def describe(source: dict) -> str:
    if "hub" in source:
        return f"{source['hub']}@{source['revision'][:12]}"
    return ", ".join(f["path"] for f in source["files"])


# ---------------------------------------------------------------- rows
def convert_all(raw: list[dict], recipe, mapping: dict, skipped: Counter) -> list[dict]:
    rows = []
    for i, row in enumerate(raw):
        try:
            rows.append(formats.convert(recipe.data.format, row, mapping, system_prompt=recipe.data.system_prompt,
                                        no_answer_text=recipe.data.no_answer_text, index=i))
        except formats.Skip as skip:
            skipped[skip.reason] += 1
    return rows


def holdout(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split; both parts keep the file order. At least one eval row once there are two rows."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    k = max(1, round(len(rows) * fraction)) if len(rows) >= 2 else 0
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def subsample(rows: list, fraction: float, max_samples: int | None, seed: int) -> list:
    keep = math.ceil(len(rows) * fraction)
    keep = min(keep, max_samples) if max_samples else keep
    if keep >= len(rows):
        return rows
    chosen = set(random.Random(seed + 1).sample(range(len(rows)), keep))
    return [r for i, r in enumerate(rows) if i in chosen]


def load_tokenizer(recipe):
    base_dir = resolve_base(recipe)
    try:
        return chat.load_tokenizer(base_dir, recipe.base.chat_template, need_template=recipe.data.format != "text")
    except (OSError, ValueError) as exc:  # ConnectionError (offline Hub) is an OSError
        raise StageError(str(exc) if "base.model" in str(exc) else f"base.model {recipe.base.model!r}: {exc}") from None


def fit_all(rows, tokenizer, template, recipe, counts: Counter, lengths: list) -> list[dict]:
    count = lambda row: len(chat.token_ids(tokenizer, row, template))  # noqa: E731
    kept = []
    for row in rows:
        fitted, status = fit(row, count, recipe.train.max_length, recipe.data.too_long)
        counts[status] += 1
        if fitted is not None:
            kept.append(fitted)
            lengths.append(count(fitted))
    return kept


def fit(row: dict, count, max_length: int, policy: str) -> tuple[dict | None, str]:
    """(row, "ok") when it fits; else truncated (later turns, then the end of the last reply/text) or dropped."""
    if count(row) <= max_length:
        return row, "ok"
    if policy == "drop" or "qa" in row:  # a QA answer cut short would teach a wrong answer
        return None, "dropped"
    if "text" in row:
        shorter = _shorten(row, "text", count, max_length)
        return (shorter, "truncated") if shorter else (None, "dropped")
    messages = list(row["messages"])
    first_user = 1 if messages[0]["role"] == "system" else 0
    while len(messages) > first_user + 2 and count({**row, "messages": messages}) > max_length:
        messages = messages[:-2]  # drop the last user/assistant exchange
    candidate = {**row, "messages": messages}
    if count(candidate) <= max_length:
        return candidate, "truncated"
    shorter = _shorten(candidate, "messages", count, max_length)
    return (shorter, "truncated") if shorter else (None, "dropped")


def _shorten(row: dict, key: str, count, max_length: int) -> dict | None:
    """Binary search for the longest prefix of the text (or last reply) that fits; None if even one char does not."""
    full = row["text"] if key == "text" else row["messages"][-1]["content"]

    def cut(n: int) -> dict:
        if key == "text":
            return {**row, "text": full[:n]}
        return {**row, "messages": row["messages"][:-1] + [{"role": "assistant", "content": full[:n].rstrip() or full[:n]}]}

    lo, hi = 0, len(full)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(cut(mid)) <= max_length else (lo, mid - 1)
    return cut(lo) if lo > 0 else None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
