"""The KL-budget chooser (hubforge.gguf_auto.choose) on synthetic costs, and llama-perplexity output parsing.

    .venv/bin/python -m pytest tests/test_gguf_auto_unit.py -q
"""
from __future__ import annotations

import itertools

import pytest

from hubforge import gguf_auto, llamatools
from hubforge.gguf_auto import Group, Option

pytestmark = pytest.mark.unit


def group(name: str, sizes: dict[str, int], kl: dict[str, float], top: dict[str, float] | None = None) -> Group:
    options = [Option(t, s, {"mean_kld": kl[t], "disagree": (top or {}).get(t, 0.0)}) for t, s in sizes.items()]
    return Group(name, rf"\.{name}\.weight$", sorted(options, key=lambda o: o.size))


def embedded_like() -> list[Group]:
    """Shaped like Gemma 3 270M: a big, insensitive embedding and small, sensitive linear layers."""
    return [
        group("token_embd", {"Q4_0": 90, "Q5_0": 115, "Q8_0": 178}, {"Q4_0": 0.030, "Q5_0": 0.008, "Q8_0": 0.0}),
        group("attn", {"Q4_0": 10, "Q5_0": 13, "Q8_0": 20}, {"Q4_0": 0.20, "Q5_0": 0.06, "Q8_0": 0.0}),
        group("ffn", {"Q4_0": 30, "Q5_0": 38, "Q8_0": 60}, {"Q4_0": 0.40, "Q5_0": 0.10, "Q8_0": 0.0}),
    ]


def brute_force(groups, limits, baseline):
    fits = [dict(zip([g.name for g in groups], combo)) for combo in itertools.product(*(g.options for g in groups))]
    fits = [c for c in fits if gguf_auto.fits(c, limits, baseline)]
    return min(sum(o.size for o in c.values()) for c in fits) if fits else None


def test_the_budget_keeps_the_sensitive_small_tensors_high_and_shrinks_the_big_one():
    choice = gguf_auto.choose(embedded_like(), {"mean_kld": 0.05}, {"mean_kld": 0.002})
    assert {n: o.type for n, o in choice.items()} == {"token_embd": "Q4_0", "attn": "Q8_0", "ffn": "Q8_0"}
    assert sum(o.size for o in choice.values()) == 170


@pytest.mark.parametrize("max_kl", [0.01, 0.04, 0.07, 0.12, 0.3, 1.0])
def test_exact_and_greedy_choices_meet_the_budget_and_the_exact_one_is_the_smallest(max_kl):
    groups, limits, baseline = embedded_like(), {"mean_kld": max_kl}, {"mean_kld": 0.002}
    exact = gguf_auto.choose(groups, limits, baseline)
    greedy = gguf_auto.choose(groups, limits, baseline, exhaustive_up_to=0)
    best = brute_force(groups, limits, baseline)
    assert sum(o.size for o in exact.values()) == best
    assert gguf_auto.fits(greedy, limits, baseline) and sum(o.size for o in greedy.values()) >= best


def test_every_limit_binds_top1_as_well_as_kl():
    groups = embedded_like()
    for g, disagree in zip(groups, (0.01, 0.05, 0.08)):  # Q4_0 costs these shares of changed top tokens, Q5_0 half
        g.options[0].cost["disagree"], g.options[1].cost["disagree"] = disagree, disagree / 2
    only_kl = gguf_auto.choose(groups, {"mean_kld": 0.5})
    both = gguf_auto.choose(groups, {"mean_kld": 0.5, "disagree": 0.06})
    assert gguf_auto.total(only_kl, "disagree", {}) > 0.06
    assert gguf_auto.total(both, "disagree", {}) <= 0.06 and gguf_auto.total(both, "mean_kld", {}) <= 0.5
    assert sum(o.size for o in both.values()) > sum(o.size for o in only_kl.values())


def test_an_unreachable_budget_returns_none_from_both_searches():
    groups = embedded_like()
    assert gguf_auto.choose(groups, {"mean_kld": 0.001}, {"mean_kld": 0.002}) is None
    assert gguf_auto.choose(groups, {"mean_kld": 0.001}, {"mean_kld": 0.002}, exhaustive_up_to=0) is None


def test_many_groups_use_the_greedy_search_and_still_meet_the_budget():
    groups = [group(f"blk{i}", {"Q4_0": 10, "Q5_0": 13, "Q8_0": 20}, {"Q4_0": 0.01 * (i % 5 + 1), "Q5_0": 0.003, "Q8_0": 0})
              for i in range(18)]  # 3**18 combinations: too many to enumerate
    choice = gguf_auto.choose(groups, {"mean_kld": 0.08})
    assert gguf_auto.fits(choice, {"mean_kld": 0.08}, {})
    assert sum(o.size for o in choice.values()) < 18 * 13  # cheaper than Q5_0 everywhere, which would also fit


def test_overrides_send_the_embedding_through_its_own_option():
    choice = gguf_auto.choose(embedded_like(), {"mean_kld": 0.05})
    kw = gguf_auto.overrides(choice, embedded_like())
    assert kw == {"tensor_types": {r"\.attn\.weight$": "Q8_0", r"\.ffn\.weight$": "Q8_0"}, "token_embedding_type": "Q4_0"}
    assert llamatools.quantize_args("Q4_K_M", None, **kw) == [
        "--tensor-type", r"\.attn\.weight$=q8_0", "--tensor-type", r"\.ffn\.weight$=q8_0", "--token-embedding-type", "q4_0"]


KLD_OUTPUT = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  13.912345 ±   0.410000
Mean PPL(base)                :  13.501234 ±   0.400000
Cor(ln(PPL(Q)), ln(PPL(base))):  99.12%
Mean ln(PPL(Q)/PPL(base))     :   0.030001 ±   0.002000
Mean PPL(Q)/PPL(base)         :   1.030456 ±   0.002000
Mean PPL(Q)-PPL(base)         :   0.411111 ±   0.030000

====== KL divergence statistics ======
Mean    KLD:   0.051234 ±   0.001234
Maximum KLD:   3.210000
99.9%   KLD:   1.900000
99.0%   KLD:   0.612345
95.0%   KLD:   0.200000
Median  KLD:   0.020000
Minimum KLD:  -0.000001

====== Token probability statistics ======
Mean    Δp: -0.512 ± 0.050 %
Same top p: 91.234 ± 0.300 %
"""


def test_parse_kld_reads_llama_perplexity_summary():
    got = llamatools.parse_kld(KLD_OUTPUT)
    assert got == {"ppl": 13.912345, "ppl_base": 13.501234, "ln_ppl_ratio": 0.030001, "mean_kld": 0.051234,
                   "p99_kld": 0.612345, "max_kld": 3.21, "same_top": pytest.approx(0.91234)}


def test_parse_kld_names_what_is_missing():
    with pytest.raises(llamatools.LlamaToolError, match="same_top"):
        llamatools.parse_kld(KLD_OUTPUT.replace("Same top p", "Something else"))


QUANTIZE_OUTPUT = """
[  12/ 236]              blk.0.attn_k.weight - [  640,   256,     1,     1], type =    f16,
warning: blk.0.attn_k.weight                  - ncols    640 not divisible by 256 (required for type    q6_K) -> falling back to    q8_0
warning: blk.0.attn_q.weight                  - ncols    640 not divisible by 256 (required for type    q4_K) -> falling back to    q5_0
warning: blk.1.attn_q.weight                  - ncols    640 not divisible by 256 (required for type    q4_K) -> falling back to    q5_0
"""


def test_fallback_warnings_are_counted_per_kind():
    assert llamatools.fallbacks(QUANTIZE_OUTPUT) == [
        {"columns": 640, "block": 256, "wanted": "Q4_K", "used": "Q5_0", "tensors": 2},
        {"columns": 640, "block": 256, "wanted": "Q6_K", "used": "Q8_0", "tensors": 1}]
    assert llamatools.fallbacks("no warnings here") == []


def test_the_stage_summarises_fallbacks_in_one_line():
    from hubforge.stages import gguf

    per_file = llamatools.fallbacks(QUANTIZE_OUTPUT)
    note = gguf.fallback_note({"Q4_K_M": per_file, "Q8_0": []})
    assert note.count("\n") == 0 and "1 of 2 quants" in note and "Q4_K->Q5_0 (2)" in note
    assert "640 columns are not a multiple of 256" in note
    assert gguf.fallback_note({"Q8_0": []}) is None


def test_an_auto_file_that_misses_the_budget_against_the_merged_model_is_dropped(tmp_path):
    from hubforge.recipe import resolve
    from hubforge.stages import gguf

    raw = {"name": "tt", "base": {"model": "embedded:gemma-3-270m"}, "data": {"hub": "x/y", "format": "messages"},
           "method": {"name": "lora"}, "export": {"gguf": {"auto": {"enabled": True, "min_top1": 0.9, "max_ppl_increase": 0.05}}}}
    recipe = resolve(raw, root=tmp_path, source="<test>")
    f16 = {"type": "F16", "perplexity": 4.0, "heldout_top1_vs_hf": 1.0}

    def check(top1: float, ppl: float) -> tuple[list, dict]:
        (tmp_path / "tt-AUTO.gguf").write_bytes(b"gguf")
        auto = {"meets": True}
        rows = gguf.hf_check_auto(recipe, [f16, {"type": "AUTO", "perplexity": ppl, "heldout_top1_vs_hf": top1}], auto, tmp_path)
        return [r["type"] for r in rows], auto

    assert check(0.93, 4.15) == (["F16", "AUTO"], {"meets": True, "hf_check": {
        "heldout_top1_vs_hf": 0.93, "perplexity": 4.15, "perplexity_limit": 4.2, "meets": True}})
    assert (tmp_path / "tt-AUTO.gguf").exists()
    types, auto = check(0.88, 4.15)
    assert types == ["F16"] and not auto["meets"] and "agreement 88.0% < 90%" in auto["reason"]
    assert not (tmp_path / "tt-AUTO.gguf").exists()  # never published
    types, auto = check(0.95, 4.3)
    assert types == ["F16"] and "perplexity 4.3 > 4.2" in auto["reason"]
