"""Chat templates that training with assistant-only loss accepts (issue #15: Llama 3.1's template, which TRL 1.16
cannot patch, stopped the PersianQA recipe at the start of training), and the checks that catch one before training.

    pytest tests/test_chat_training.py
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hubforge import chat

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|python_tag|>"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Iran?"},
                {"role": "assistant", "content": "Tehran."}, {"role": "user", "content": "And of Turkey?"},
                {"role": "assistant", "content": "Ankara."}]


def tiny_llama_tokenizer(template: str):
    """A byte-level BPE tokenizer with Llama 3's special tokens, built locally (no Hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(LLAMA_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|end_of_text|>")
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.unit
@pytest.mark.parametrize("choice", sorted(chat.TRL_TEMPLATES))
def test_every_template_a_recipe_may_name_is_trainable(choice):
    support = chat.training_support(chat.trl_template(choice))
    assert support.startswith(("trl:", "hubforge:", "markers"))
    assert chat.check_trainable(choice, chat.trl_template(choice)) is None


@pytest.mark.unit
def test_llama3_1_gets_hubforge_variant_and_a_whitespace_copy_too():
    text = chat.trl_template("llama3_1")
    assert chat.training_support(text) == "hubforge:llama3_1_training.jinja"
    assert chat.training_support("\n" + text + "\n") == "hubforge:llama3_1_training.jinja"
    assert "{%- generation %}" in chat.training_template(text)
    assert chat.training_template(chat.trl_template("gemma3")) is None  # TRL patches that one itself


@pytest.mark.unit
def test_training_variant_renders_the_same_text_and_marks_assistant_turns_with_their_end_token():
    plain = chat.trl_template("llama3_1")
    tokenizer = tiny_llama_tokenizer(plain)
    variant = chat.training_template(plain)
    assert (tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
            == tokenizer.apply_chat_template(CONVERSATION, tokenize=False, chat_template=variant))
    enc = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, chat_template=variant,
                                        return_assistant_tokens_mask=True)
    marked = tokenizer.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert marked == "Tehran.<|eot_id|>Ankara.<|eot_id|>"
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    assert is_chat_template_stop_token_trained(tokenizer, chat_template=variant)  # TRL's own check: it learns to stop
    # a tool call is an assistant turn too: the call and its end token carry loss, the tool's answer does not
    calls = [{"role": "user", "content": "2*3?"},
             {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "mul", "arguments": {"a": 2}}}]},
             {"role": "tool", "name": "mul", "content": "6"}]
    enc = tokenizer.apply_chat_template(calls, tokenize=True, return_dict=True, chat_template=variant,
                                        return_assistant_tokens_mask=True)
    marked = tokenizer.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert marked == '{"name": "mul", "parameters": {"a": 2}}<|eot_id|>'


@pytest.mark.unit
def test_a_template_training_would_refuse_is_named_with_the_recipe_field():
    problem = chat.check_trainable("auto", "{% for m in messages %}{{ m['content'] }}{% endfor %}", "llama3")
    assert problem.startswith("base.chat_template 'auto' (family llama3)")
    assert "train.assistant_only_loss: false" in problem and "llama3_1" in problem


@pytest.mark.unit
def test_plan_and_preflight_refuse_a_local_base_whose_own_template_training_refuses(make_recipe, tmp_path):
    import json

    from hubforge import pipeline
    from hubforge.errors import StageError
    from hubforge.plan import build_plan

    recipe = make_recipe()
    config = recipe.local_path("./base") / "tokenizer_config.json"
    settings = json.loads(config.read_text("utf-8"))
    assert build_plan(recipe)["problems"] == []
    for name in ("chat_template.jinja",):
        (recipe.local_path("./base") / name).unlink(missing_ok=True)
    config.write_text(json.dumps({**settings, "chat_template": "{{ messages[0]['content'] }}"}), "utf-8")
    problems = build_plan(recipe)["problems"]
    assert len(problems) == 1 and "base.chat_template 'auto'" in problems[0]
    with pytest.raises(StageError, match="base.chat_template 'auto'"):
        pipeline.preflight(recipe, pipeline.select_stages(["data", "train"]))
    pipeline.preflight(recipe, pipeline.select_stages(["data"]))  # no training, no refusal
    assert build_plan(make_recipe(train={"assistant_only_loss": False}))["problems"] == []


@pytest.mark.integration
def test_sft_trainer_accepts_llama3_1_with_the_variant_and_refuses_without(tmp_path):
    """TRL's own trainer on a tiny random Llama: the failure of issue #15 reproduced, and gone with the variant."""
    script = f"""
import sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from test_chat_training import tiny_llama_tokenizer, CONVERSATION
from hubforge import chat
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer
plain = chat.trl_template("llama3_1")
tok = tiny_llama_tokenizer(plain)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2)
args = SFTConfig(output_dir={str(tmp_path)!r}, max_steps=1, per_device_train_batch_size=2, assistant_only_loss=True,
                 report_to=[], use_cpu=True, max_length=256)
rows = Dataset.from_list([{{"messages": CONVERSATION}}] * 4)
try:
    SFTTrainer(model=LlamaForCausalLM(cfg), args=args, processing_class=tok, train_dataset=rows)
    print("PLAIN ACCEPTED")
except ValueError as exc:
    print("PLAIN REFUSED:", exc)
tok.chat_template = chat.training_template(plain)
trainer = SFTTrainer(model=LlamaForCausalLM(cfg), args=args, processing_class=tok, train_dataset=rows)
ex = trainer.train_dataset[0]
print("LOSS ON:", tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != -100]))
trainer.train()
print("TRAINED")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"PLAIN REFUSED: The chat template is not training-compatible", out.stdout)
    assert "LOSS ON: Tehran.<|eot_id|>Ankara.<|eot_id|>" in out.stdout and "TRAINED" in out.stdout


@pytest.mark.unit
def test_marker_test_agrees_with_trls_own():
    from trl.chat_template_utils import has_generation_markers

    for text in ["{% generation %}x{% endgeneration %}", "{%- generation -%}", "{%-generation%}", "{{ generation }}",
                 chat.trl_template("llama3_1"), chat.training_template(chat.trl_template("llama3_1"))]:
        assert chat.has_generation_markers(text) == has_generation_markers(text), text
