"""Measuring a model on the run's held-out rows, one way for every stage: the rows (the one reader of
data/eval.jsonl), their encoding for loss exactly as training scored them, prompt and stop ids, perplexity, and
logit comparisons (max |Δ|, KL, top-1 agreement). Merge, evaluate and gguf measure through these functions only
(like nanochat's loss_eval), so their numbers agree by construction.

    from hubforge import scoring
    rows = scoring.held_out_rows(run_dir)                      # [] when the data stage wrote none
    ids, masks, info = scoring.scored_held_out(recipe, run_dir, tokenizer, template, limit=25)
    scoring.perplexity(model, ids, masks)

One loss computation, `nll` (batched, right-padded, the LM head on the scored positions only): `perplexity` is it
one row at a time, rounded (merge and gguf), `heldout_loss` is it in batches with loss, timing and progress (evaluate).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from hubforge import chat
from hubforge.errors import StageError

PPL_TOKENS = 256  # held-out rows are cut to this many tokens for merge's and gguf's perplexity (and llama.cpp's n_ctx)
FALLBACK_TEXTS = ("سلام! امروز هوا خیلی خوب است و می‌خواهم کمی در پارک قدم بزنم.",
                  "The quick brown fox jumps over the lazy dog near the river bank.",
                  "Merhaba, bugün İstanbul'da hava çok güzel.")


# ---------------------------------------------------------------- rows
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines() if line.strip()]


def held_out_rows(run_dir, limit: int | None = None) -> list[dict]:
    """The data stage's held-out rows (data/eval.jsonl), the first `limit` of them; [] when there is no such file."""
    path = run_dir.path / "data" / "eval.jsonl"
    return read_jsonl(path)[:limit] if path.is_file() else []


def split_name(recipe) -> str:
    """How cards and results.json name the held-out rows."""
    d = recipe.data
    return d.eval_split or f"{d.eval_fraction:g} of {d.split} held out with seed {recipe.train.seed}"


# ---------------------------------------------------------------- tokenisation
def scoring_template(tokenizer, recipe) -> tuple[str | None, str]:
    """The template variant with {% generation %} markers that TRL trains with, when only assistant tokens count."""
    if not (recipe.train.assistant_only_loss and recipe.data.format != "text"):
        return None, "all"
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template, "assistant"
    # the variant the train stage trained with: hubforge's own where TRL cannot patch the template (hubforge.chat)
    marked = chat.training_template(tokenizer.chat_template) or get_training_chat_template(tokenizer)
    return (marked, "assistant") if marked else (None, "all")


def encode_for_loss(tokenizer, row: dict, marked_template: str | None, max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, 0/1 mask of the tokens whose prediction is scored), as TRL's SFTTrainer tokenises the row."""
    if "messages" in row:
        enc = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True, chat_template=marked_template,
                                            return_assistant_tokens_mask=marked_template is not None)
        ids = list(enc["input_ids"])
        mask = list(enc["assistant_masks"]) if marked_template is not None else [1] * len(ids)
    else:
        text = row["text"] if row["text"].endswith(tokenizer.eos_token) else row["text"] + tokenizer.eos_token
        ids = list(tokenizer(text=text)["input_ids"])
        mask = [1] * len(ids)
    return ids[:max_length], mask[:max_length]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation with the generation prompt appended (the chat template's)."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              add_generation_prompt=True)["input_ids"])


def stop_ids(model_dir: Path, extra: tuple = ()) -> list[int]:
    """End-of-sequence ids of a checkpoint's generation config (e.g. Gemma's <eos> and <end_of_turn>), plus `extra`
    (evaluate adds the tokenizer's end token; gguf holds llama.cpp to the checkpoint's own list)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted({int(i) for i in [*ids, *extra] if i is not None})


def held_out_ids(run_dir, tokenizer, template, limit: int) -> tuple[list[list[int]], dict]:
    """Token ids of the first held-out rows (rendered as in training), or of a few fixed texts when there are none."""
    rows = held_out_rows(run_dir, limit)
    ids = [chat.token_ids(tokenizer, {k: v for k, v in r.items() if k != "qa"}, template)[:PPL_TOKENS] for r in rows]
    source = "data/eval.jsonl"
    if not any(len(i) > 1 for i in ids):
        ids, source = [tokenizer(text)["input_ids"] for text in FALLBACK_TEXTS], "fixed texts (no data/eval.jsonl)"
    ids = [list(i) for i in ids if len(i) > 1]
    return ids, {"source": source, "rows": len(ids), "tokens": sum(map(len, ids))}


def scored_held_out(recipe, run_dir, tokenizer, template, limit: int) -> tuple[list[list[int]], list[list[int]], dict]:
    """Held-out token ids and 0/1 masks of the tokens perplexity scores, by the evaluate stage's rule: assistant turns
    when the recipe trains on them only, else every token; a few fixed texts when the run has no held-out rows."""
    rows = held_out_rows(run_dir, limit)
    marked, scored = scoring_template(tokenizer, recipe)
    encoded = [encode_for_loss(tokenizer, chat.for_template(r, template), marked, PPL_TOKENS) for r in rows]
    encoded = [(ids, mask) for ids, mask in encoded if sum(mask[1:])]
    if encoded:
        return [ids for ids, _ in encoded], [mask for _, mask in encoded], {
            "source": "data/eval.jsonl", "rows": len(encoded), "tokens": sum(len(ids) for ids, _ in encoded),
            "tokens_scored": scored, "scored_tokens": sum(sum(mask[1:]) for _, mask in encoded)}
    ids, info = held_out_ids(run_dir, tokenizer, template, limit)
    return ids, [[1] * len(i) for i in ids], {**info, "tokens_scored": "all", "scored_tokens": sum(len(i) - 1 for i in ids)}


# ---------------------------------------------------------------- measurements
def logits(model, sequences: list[list[int]]) -> list:
    import torch

    with torch.inference_mode():
        return [model(torch.tensor([ids])).logits[0].float() for ids in sequences]


def nll(model, encoded: list, pad_id: int = 0, batch_size: int = 1, progress=None,
        choices: list | None = None) -> tuple[float, int]:
    """(summed next-token NLL, number of scored tokens) over (token ids, 0/1 mask) rows: the one loss computation
    every perplexity here comes from. Rows of similar length are batched with right padding (positions as in
    training); the LM head runs on the scored positions only, in chunks, so a 262k vocabulary never materialises
    (batch, seq, vocab) logits. `progress` wraps the batch loop (a tqdm). `choices`, when given, receives per row
    (in the order of `encoded`) the model's argmax token at each scored position, from the same forward pass."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    device = next(model.parameters()).device
    # similar lengths together: less padding (the sum is order-free; choices go back to their rows' places)
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k][0]))
    picked: list = [None] * len(encoded)
    encoded = [encoded[k] for k in order]
    for i in (progress or iter)(range(0, len(encoded), batch_size)):
        batch = encoded[i:i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in batch], device=device)  # right padding: positions as in training
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch], device=device)
        scored = torch.tensor([m + [0] * (width - len(m)) for _, m in batch], device=device)[:, 1:].bool()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, logits_to_keep=1)
            hidden = out.hidden_states[-1][:, -width:][:, :-1][scored]  # [-width:]: drop prompt-tuning virtual tokens
            targets = ids[:, 1:][scored]
            argmax = []
            for j in range(0, len(targets), 512):
                chunk = head(hidden[j:j + 512]).float()
                chunk = torch.tanh(chunk / cap) * cap if cap else chunk
                total += F.cross_entropy(chunk, targets[j:j + 512], reduction="sum").item()
                argmax.append(chunk.argmax(-1))
        if choices is not None:  # the flattened scored positions, row by row
            flat = torch.cat(argmax).cpu().numpy() if argmax else []
            for r, n in enumerate(scored.sum(dim=1).tolist()):
                picked[order[i + r]], flat = flat[:n], flat[n:]
        count += int(scored.sum())
    if choices is not None:
        choices.extend(picked)
    if count == 0:
        raise StageError("no tokens to score in the eval rows (every assistant turn is empty or truncated away); "
                         "check train.max_length and train.assistant_only_loss")
    return total, count


def perplexity(model, sequences: list[list[int]], masks: list[list[int]] | None = None,
               choices: list | None = None) -> float:
    """exp(mean next-token NLL), rounded to 6 decimals; with `masks`, only over the tokens marked 1 (e.g. assistant
    turns, as in training). One row at a time (no padding): merge and gguf score a few short rows. `choices`: as
    in nll()."""
    masks = masks if masks is not None else [[1] * len(ids) for ids in sequences]
    total, count = nll(model, list(zip(sequences, masks)), choices=choices)
    return round(math.exp(total / count), 6)


def heldout_loss(model, encoded: list, pad_id: int, batch_size: int, tqdm, key: str) -> dict:
    """Token-weighted mean NLL and perplexity over the scored tokens of many rows, in batches (the evaluate stage)."""
    started = time.time()
    total, count = nll(model, encoded, pad_id, batch_size, lambda r: tqdm(r, desc=f"[evaluate] {key} loss"))
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count,
            "seconds": round(time.time() - started, 2)}


def compare(reference: list, other: list) -> tuple[float, float]:
    """(max |Δ logit|, mean KL(reference || other) per position) over all compared positions."""
    import torch

    max_diff = max(float((a - b).abs().max()) for a, b in zip(reference, other))
    kl = torch.cat([torch.nn.functional.kl_div(b.double().log_softmax(-1), a.double().log_softmax(-1), log_target=True,
                                               reduction="none").sum(-1) for a, b in zip(reference, other)])
    return max_diff, float(kl.mean())


def teacher_forced(hf_logprobs: list, gguf_logits: list) -> tuple[float, float]:
    """(mean KL(HF || GGUF), share of same argmax) over all prompt positions, both models fed the same tokens."""
    import torch

    kl, same, count = 0.0, 0, 0
    for ref, got in zip(hf_logprobs, gguf_logits):
        got = torch.from_numpy(got).log_softmax(-1)
        kl += float((ref.exp() * (ref - got)).sum())
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        count += len(ref)
    return kl / count, same / count
