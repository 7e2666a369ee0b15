"""merge stage on the tiny Gemma 3: LoRA and QLoRA merges verified against PEFT, refusal, full, not-applicable.

    .venv/bin/python -m pytest tests/test_merge.py -q -p no:cacheprovider
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "gguf"))
from make_adapters import fake_run, make_lora_adapter  # noqa: E402

pytestmark = pytest.mark.integration
TEXT = "سلام! امروز می‌خواهم درباره‌ی دریا بنویسم. The sea is calm."


@pytest.fixture(scope="module")
def lora_adapter(tiny_base, tmp_path_factory):
    return make_lora_adapter(tiny_base, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def qlora_adapter(tiny_base, tmp_path_factory):
    return make_lora_adapter(tiny_base, tmp_path_factory.mktemp("qlora") / "adapter", quantized=True, seed=1)


def logits_of(model, tokenizer):
    import torch

    with torch.inference_mode():
        return model(torch.tensor([tokenizer(TEXT)["input_ids"]])).logits[0]


def test_lora_merge_matches_peft_and_ships_everything(make_recipe, lora_adapter, tiny_base, persian_chat_file, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hubforge.stages import merge

    recipe = make_recipe()
    run_dir = fake_run(tmp_path / "run", lora_adapter, persian_chat_file)
    result = merge.run(recipe, run_dir)

    model_dir = run_dir.path / result["model_dir"]
    assert result["merge_into"] == "original" and result["dtype"] == "bfloat16" and result["gated"]
    assert result["max_abs_logit_diff"] < 1e-3 and result["mean_kl"] < 1e-6  # the merge itself, float32
    assert 0 < result["dtype_rounding"]["max_abs_logit_diff"] < 0.05 and result["saved_files_max_abs_logit_diff"] < 1e-4
    assert result["held_out"]["source"] == "data/eval.jsonl" and result["held_out"]["compare_rows"] == 4
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    assert (model_dir / "tokenizer.model").read_bytes() == (tiny_base / "tokenizer.model").read_bytes()
    with safe_open(model_dir / "model.safetensors", "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((tiny_base / "generation_config.json").read_text())["eos_token_id"]

    # Independently of the stage: the merged checkpoint computes what base + adapter computes, and the adapter matters.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_base).chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    base_logits = logits_of(base, tokenizer)
    peft_logits = logits_of(PeftModel.from_pretrained(base, lora_adapter).eval(), tokenizer)
    merged_logits = logits_of(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tokenizer)
    merge_error = float((merged_logits - peft_logits).abs().max())
    assert merge_error < recipe.export.merge_max_abs_logit_diff
    assert float((base_logits - peft_logits).abs().max()) > 20 * merge_error


def test_merge_that_does_not_match_peft_is_refused(make_recipe, lora_adapter, persian_chat_file, tmp_path, monkeypatch):
    import torch
    from hubforge.pipeline import StageError
    from hubforge.stages import merge

    def doubled(peft):  # a merge bug: the LoRA delta applied with twice its scale ("double LoRA")
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.mul_(2)
        return peft.merge_and_unload()

    monkeypatch.setattr(merge, "fold", doubled)
    run_dir = fake_run(tmp_path / "run", lora_adapter, persian_chat_file)
    with pytest.raises(StageError, match="merge refused.*export.merge_max_abs_logit_diff = 0.05"):
        merge.run(make_recipe(), run_dir)
    assert not (run_dir.path / "merge" / "model").exists()


def test_qlora_measures_both_merge_targets_and_honours_the_setting(make_recipe, qlora_adapter, persian_chat_file, tmp_path):
    from hubforge.stages import merge

    run_dir = fake_run(tmp_path / "run", qlora_adapter, persian_chat_file, method="qlora")
    auto = merge.run(make_recipe(method={"name": "qlora"}), run_dir)
    assert set(auto["ppl"]) == {"peft", "merged_original", "merged_dequantized"}
    targets = auto["targets"]
    assert auto["merge_into"] == min(targets, key=lambda t: targets[t]["ppl"]) and auto["merge_into_setting"] == "auto"
    # The adapter was trained on NF4 weights: merged into their dequantized form it stays closer to the trained model.
    assert targets["dequantized"]["kl_vs_trained_4bit"] < targets["original"]["kl_vs_trained_4bit"]
    assert auto["max_abs_logit_diff"] < 1e-3 and auto["dtype_rounding"]["max_abs_logit_diff"] < 0.05

    other = "original" if auto["merge_into"] == "dequantized" else "dequantized"
    forced = merge.run(make_recipe(method={"name": "qlora"}, export={"merge_into": other}), run_dir)
    assert forced["merge_into"] == other and forced["ppl"] == auto["ppl"]


def test_full_checkpoint_is_cast_not_merged(make_recipe, tiny_base, persian_chat_file, tmp_path):
    from hubforge.stages import merge

    run_dir = fake_run(tmp_path / "run", None, persian_chat_file, method="full", model_dir=tiny_base)
    result = merge.run(make_recipe(method={"name": "full"}, export={"merge_dtype": "float16"}), run_dir)
    assert result["merge_into"] is None and result["dtype"] == "float16" and not result["gated"]
    assert abs(result["ppl"]["merged"] - result["ppl"]["trained"]) / result["ppl"]["trained"] < 0.01
    assert (run_dir.path / "merge" / "model" / "tokenizer.model").is_file()


def test_prompt_methods_and_disabled_merge_are_not_applicable(make_recipe, tmp_path):
    from hubforge.rundir import RunDir
    from hubforge.stages import merge

    run_dir = RunDir.open(tmp_path / "run")
    for method in ("prompt_tuning", "p_tuning"):
        result = merge.run(make_recipe(method={"name": method}), run_dir)
        assert result["status"] == "not_applicable" and "nothing to merge" in result["reason"]
    assert merge.run(make_recipe(export={"merge": False}), run_dir) == {"status": "not_applicable", "reason": "export.merge is false"}
    assert not (run_dir.path / "merge").exists()


def test_pick_target():
    from hubforge.stages.merge import pick_target

    measured = {"original": {"ppl": 12.5}, "dequantized": {"ppl": 12.1}}
    assert pick_target(measured, "auto") == "dequantized"
    assert pick_target(measured, "original") == "original"
