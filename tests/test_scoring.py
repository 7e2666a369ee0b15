"""The one loss computation (scoring.nll) behind merge's and gguf's `perplexity` and evaluate's `heldout_loss`, on a
tiny random Gemma 3: it counts exactly the masked tokens, agrees with an independent float64 computation from the
model's full logits, does not depend on batching or padding beyond float32 rounding, and applies logit soft-capping."""
from __future__ import annotations

import copy
import math
import random

import pytest

from hubforge import scoring
from hubforge.errors import StageError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def rows():
    rng = random.Random(1)
    seqs = [[2] + [rng.randrange(4, 1000) for _ in range(rng.randrange(3, 200))] for _ in range(9)]
    masks = [[rng.random() < 0.5 for _ in s] for s in seqs]
    masks[3] = [1] + [0] * (len(seqs[3]) - 1)  # nothing scored in this row (the first token is never predicted)
    return seqs, [[int(x) for x in m] for m in masks]


def reference(model, seqs, masks) -> tuple[float, int]:
    """Summed NLL from the model's full logits in float64, one row at a time (no padding, no head tricks)."""
    import torch

    total, count, cap = 0.0, 0, getattr(model.config, "final_logit_softcapping", None)
    with torch.no_grad():
        for ids, mask in zip(seqs, masks):
            logits = model(torch.tensor([ids])).logits[0, :-1].double()  # the model applies its soft-cap itself
            picked = logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            total -= float(picked[torch.tensor(mask[1:]).bool()].sum())
            count += sum(mask[1:])
    assert cap is None or float(logits.abs().max()) <= cap
    return total, count


def no_progress(items, **_):
    return items


def test_perplexity_and_heldout_loss_are_one_computation(model, rows):
    seqs, masks = rows
    total, count = scoring.nll(model, list(zip(seqs, masks)))
    ref_total, ref_count = reference(model, seqs, masks)
    assert count == ref_count == sum(sum(m[1:]) for m in masks) > 0
    assert total == pytest.approx(ref_total, rel=1e-6)
    assert scoring.perplexity(model, seqs, masks) == round(math.exp(total / count), 6)
    one = scoring.heldout_loss(model, list(zip(seqs, masks)), 0, 1, no_progress, "t")
    assert (one["loss"], one["tokens"]) == (total / count, count)  # batch 1: the very same numbers as perplexity's
    for batch_size in (2, 4, 16):  # right padding and the attention mask keep padded rows' numbers (float32 rounding)
        batched = scoring.heldout_loss(model, list(zip(seqs, masks)), 0, batch_size, no_progress, "t")
        assert batched["tokens"] == count and batched["loss"] == pytest.approx(total / count, rel=1e-6)


def test_without_masks_every_token_after_the_first_counts(model, rows):
    seqs, _ = rows
    everything = [[1] * len(s) for s in seqs]
    total, count = reference(model, seqs, everything)
    assert count == sum(len(s) - 1 for s in seqs)
    assert scoring.perplexity(model, seqs) == scoring.perplexity(model, seqs, everything)
    assert scoring.perplexity(model, seqs) == pytest.approx(math.exp(total / count), rel=1e-6)


def test_soft_capped_logits_are_scored_as_the_model_caps_them(model, rows):
    seqs, masks = rows
    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 0.5
    total, count = reference(capped, seqs, masks)
    got, got_count = scoring.nll(capped, list(zip(seqs, masks)), batch_size=4)
    assert got_count == count and got == pytest.approx(total, rel=1e-6)
    assert abs(got - scoring.nll(model, list(zip(seqs, masks)))[0]) > 1e-3 * total  # the cap changes the number


def test_nothing_to_score_is_a_stage_error_for_both(model, rows):
    seqs, _ = rows
    nothing = [[1] + [0] * (len(s) - 1) for s in seqs]
    with pytest.raises(StageError, match="no tokens to score"):
        scoring.perplexity(model, seqs, nothing)
    with pytest.raises(StageError, match="no tokens to score"):
        scoring.heldout_loss(model, list(zip(seqs, nothing)), 0, 4, no_progress, "t")


def test_choices_are_the_full_logits_argmax_at_the_scored_positions_row_by_row(model, rows):
    """gguf's held-out agreement compares these with llama.cpp's choices: they must be per row, in the rows' order
    (nll sorts rows by length internally), and exactly the argmax of the model's own full logits."""
    import numpy as np
    import torch

    seqs, masks = rows
    for batch_size in (1, 4):
        choices: list = []
        scoring.nll(model, list(zip(seqs, masks)), batch_size=batch_size, choices=choices)
        assert len(choices) == len(seqs)
        with torch.no_grad():
            for ids, mask, got in zip(seqs, masks, choices):
                want = model(torch.tensor([ids])).logits[0, :-1].argmax(-1).numpy()[np.asarray(mask[1:], bool)]
                assert np.array_equal(np.asarray(got), want)
    via_ppl: list = []
    scoring.perplexity(model, seqs, masks, via_ppl)
    assert all(np.array_equal(a, b) for a, b in zip(via_ppl, choices))
