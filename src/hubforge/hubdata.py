"""The Hub datasets the shipped recipes name: rows per split (from their cards) and tokens per row (measured on the
shipped stand-in sample of the same format), so that `hubforge plan` can estimate a run's total tokens offline.

    hubforge plan recipes/gemma-3-270m/dolly-lora.yaml      # the "Train tokens" and "Train time (est.)" rows
    PYTHONPATH=src python -m hubforge.hubdata               # re-measure TOKENS after a sample or a recipe changes

`estimate(recipe)` is pure arithmetic on the two tables, so it runs in the slim pull-request job (no transformers).
The tokens per row are NOT the dataset's own: they are the lengths of the rows of `standin.SAMPLES[hub]`, converted
with the shipped recipe's data settings (format, columns, system prompt) and tokenized with the embedded Gemma 3
tokenizer and the recipe's chat template, exactly as the data stage counts them. tests/test_hubdata.py re-measures
them with `measure` and fails when the table is stale. The stand-in rows were written short, so the real rows are
probably longer: the plan says so beside the number.
"""
from __future__ import annotations

import math

from hubforge import standin

# Rows per split, from each dataset's card (the `dataset_info` block or its own table), or None where no source
# found states a count.
ROWS = {
    # databricks/databricks-dolly-15k: the card says "more than 15,000 records" and the viewer "15k"; the exact count
    # is from recastai/databricks-dolly-15k-chatml, a row-for-row conversion of it (card: num_examples 15011).
    "databricks/databricks-dolly-15k": {"train": 15_011},
    # miladmim/slim-orca-dedup-chat-50k-persian: no card or viewer figure found; "50k" in its name is not a count.
    "miladmim/slim-orca-dedup-chat-50k-persian": None,
    # malhajar/alpaca-gpt4-tr: card at commit 0ee5189 (dataset_info: train num_examples 52002, as alpaca-gpt4's).
    "malhajar/alpaca-gpt4-tr": {"train": 52_002},
    # mshojaei77/persian-gk: card, "Data Splits" table and dataset_info: train 5,897 conversations.
    "mshojaei77/persian-gk": {"train": 5_897},
    # SajjadAyoubi/persian_qa: card's "Statistic" table: train 9,000 (2,700 unanswerable), test 938 (280), served
    # as the `validation` split.
    "SajjadAyoubi/persian_qa": {"train": 9_000, "validation": 938},
}

# Tokens of each row of the stand-in sample, as the shipped recipe naming the dataset formats it (the `measure`
# below; its test keeps this table equal to a fresh measurement). Lengths before fitting to train.max_length.
TOKENS = {
    "databricks/databricks-dolly-15k": (
        25, 78, 45, 78, 37, 49, 33, 25, 64, 37, 25, 46, 80, 49, 53, 69, 31, 24, 30, 60, 56, 39, 25, 54, 70, 35,
        25, 56, 30, 36, 44, 27,
    ),
    "miladmim/slim-orca-dedup-chat-50k-persian": (
        78, 61, 61, 137, 60, 51, 74, 67, 129, 78, 65, 58, 77, 61, 61, 73, 72, 56, 81, 64, 59, 74, 67, 54, 75,
        59, 88, 74, 57, 80, 74, 67,
    ),
    "malhajar/alpaca-gpt4-tr": (
        41, 47, 59, 85, 36, 55, 50, 54, 49, 68, 46, 46, 57, 58, 36, 64, 49, 63, 51, 42, 47, 76, 61, 64, 51, 46,
        54, 65, 44, 58,
    ),
    "mshojaei77/persian-gk": (
        78, 61, 61, 137, 60, 51, 74, 67, 129, 78, 65, 58, 77, 61, 61, 73, 72, 56, 81, 64, 59, 74, 67, 54, 75,
        59, 88, 74, 57, 80, 74, 67,
    ),
    "SajjadAyoubi/persian_qa": (
        176, 183, 183, 180, 183, 183, 174, 171, 167, 168, 171, 178, 182, 179, 179, 180, 182, 181, 183, 183,
        183, 178, 178, 176, 179, 177, 185, 190, 188, 188, 190,
    ),
}


def estimate(recipe) -> dict:
    """{"rows", "per_row", "how"} for the recipe's Hub dataset, or {"rows": None, "how": why not}. Rows follow the data
    stage: the named split, less the held-out eval share when there is no eval split, times data.fraction, capped at
    data.max_samples, less the rows too long for train.max_length that it would drop (QA rows, data.too_long drop)."""
    d, max_length = recipe.data, recipe.train.max_length
    if d.hub not in ROWS:
        return {"rows": None, "how": f"dataset {d.hub} is not in hubforge.hubdata's table of known Hub datasets, so its "
                                     "size is not known offline; the data stage counts its tokens"}
    splits = ROWS[d.hub] or {}
    if d.split not in splits:
        return {"rows": None, "how": f"dataset {d.hub}: no source found states the rows of its {d.split!r} split "
                                     "(hubforge.hubdata); the data stage counts its tokens"}
    rows = splits[d.split]
    if not d.eval_split:  # stages/data.py holdout(): at least one eval row once there are two
        rows -= max(1, round(rows * d.eval_fraction)) if rows >= 2 else 0
    rows = math.ceil(rows * d.fraction)  # stages/data.py subsample()
    rows = min(rows, d.max_samples) if d.max_samples else rows
    lengths = TOKENS[d.hub]
    drops = d.format == "squad" or d.too_long == "drop"  # a QA answer is never truncated (stages/data.py fit())
    kept = [min(n, max_length) for n in lengths if not (drops and n > max_length)] or [max_length]
    rows = round(rows * len(kept) / len(lengths))
    per_row = sum(kept) / len(kept)
    sample = f"{standin.FOLDER}/{standin.SAMPLES[d.hub]}"
    return {"rows": rows, "per_row": per_row,
            "how": f"estimate: rows from the dataset card × ≈ {per_row:.0f} tokens/row, the mean of {sample}, "
                   "a stand-in sample of the same format tokenized with the embedded Gemma 3 tokenizer after the "
                   "recipe's formatting and train.max_length; not the dataset's own rows, which are probably longer"}


def measure(recipe, sample_path, tokenizer, template) -> tuple[int, ...]:
    """Tokens of each row of `sample_path`, converted with the recipe's data settings and counted as the data stage
    counts them (hubforge.chat.token_ids); rows the converter skips are left out."""
    from hubforge import chat, formats
    from hubforge.datarows import read_rows

    d = recipe.data
    mapping = formats.column_map(d.format, d.columns)
    out = []
    for i, raw in enumerate(read_rows(sample_path)[0]):
        try:
            row = formats.convert(d.format, raw, mapping, system_prompt=d.system_prompt, no_answer_text=d.no_answer_text, index=i)
        except formats.Skip:
            continue
        out.append(len(chat.token_ids(tokenizer, row, template)))
    return tuple(out)


def measure_shipped(repo) -> dict:
    """hub -> (recipe, lengths) for every shipped recipe that names a Hub dataset (one tokenizer per chat template)."""
    from pathlib import Path

    from hubforge import chat
    from hubforge.base import fetch_embedded
    from hubforge.recipe import find_recipes, load_recipe

    base, tokenizers, out = fetch_embedded(), {}, {}
    for path in find_recipes([Path(repo) / "recipes"]):
        recipe = load_recipe(path)
        if not recipe.data.hub or recipe.data.hub not in standin.SAMPLES:
            continue
        choice = recipe.base.chat_template
        if choice not in tokenizers:
            tokenizers[choice] = chat.load_tokenizer(base, choice)
        sample = Path(repo) / standin.FOLDER / standin.SAMPLES[recipe.data.hub]
        out.setdefault(recipe.data.hub, []).append((path, measure(recipe, sample, *tokenizers[choice])))
    return out


if __name__ == "__main__":
    from pathlib import Path

    for hub, found in measure_shipped(Path(__file__).resolve().parents[2]).items():
        print(f"    {hub!r}: {found[0][1]},  # {', '.join(p.name for p, _ in found)}")
