"""merge + gguf on the embedded Gemma 3 270M: a real vocabulary (262k SentencePiece pieces with user-defined
whitespace runs), real logit scales for the merge and f16 gates, K-quant fallbacks (hidden 640 is not a multiple
of 256), and the LoRA-GGUF check. Several minutes on 2 cores.

    .venv/bin/python -m pytest tests/test_gguf_embedded.py -q -p no:cacheprovider
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "gguf"))
from make_adapters import fake_run, make_lora_adapter  # noqa: E402

pytestmark = pytest.mark.slow


def test_embedded_lora_merges_and_exports_verified(tmp_path, persian_chat_file):
    from hubforge.base import resolve_base
    from hubforge.recipe import resolve
    from hubforge.stages import gguf, merge

    raw = {"name": "embedded-gguf", "base": {"model": "embedded:gemma-3-270m"}, "data": {"hub": "hubforge/unused", "format": "messages"},
           "method": {"name": "lora"}, "eval": {"max_samples": 4}, "export": {"gguf": {"quants": ["Q8_0", "Q4_K_M"], "lora": True,
                                                                 # the e2e demo test covers the matrix on this model
                                                                 "imatrix": {"enabled": False}}}}
    recipe = resolve(raw, root=tmp_path, source="<test>")
    adapter = make_lora_adapter(resolve_base(recipe), tmp_path / "adapter", scale=0.01)
    run_dir = fake_run(tmp_path / "run", adapter, persian_chat_file, eval_rows=4)

    merged = merge.run(recipe, run_dir)
    assert merged["max_abs_logit_diff"] <= recipe.export.merge_max_abs_logit_diff
    run_dir.mark("merge", status="done", result=merged)
    result = gguf.run(recipe, run_dir)

    assert result["tokenizer_probe"]["ok"], result["tokenizer_probe"]["problems"]
    files = {row["type"]: row for row in result["files"]}
    assert files["F16"]["decisive_agreement"] == 1.0 and files["F16"]["kl_vs_hf"] < gguf.MAX_MEAN_KL
    assert all(d["tie"] for d in files["F16"]["greedy_divergences"])
    assert files["F16"]["margin_noise_max"] < gguf.TIE_MARGIN / 2  # the tie margin stays well above rounding noise
    assert files["Q8_0"]["bits_per_weight"] > files["Q4_K_M"]["bits_per_weight"]
    assert all(row["tokens_per_s"] > 0 for row in files.values())
    assert result["lora_gguf"]["kl_vs_merged"] < result["lora_gguf"]["kl_limit"] and result["lora_gguf"]["top1_agreement_vs_merged"] > 0.9
