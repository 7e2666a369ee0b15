"""Ollama's `template` and `params` files (hubforge.ollama): rendered with Go's own text/template, they give the
prompt the HF chat template gives, for every family a recipe may name.

    .venv/bin/python -m pytest tests/test_ollama.py -q -p no:cacheprovider

The Go tests need `go` (Debian's golang-go, installed by `make test`); they fail, not skip, without it.
"""
from __future__ import annotations

import json

import pytest

from hubforge import ollama
from hubforge.chat import trl_template, trl_templates_dir

# A final assistant turn is a prefill in Ollama; HF renders it with continue_final_message.
PREFILLS = ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, the answer is"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Well"}])


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    from ollama_render import go_renderer

    return go_renderer(tmp_path_factory.mktemp("go"))


def hf_prefill(tokenizer, template: str, messages: list[dict]) -> str:
    from hubforge.chat import fold_system

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, continue_final_message=True)
    except Exception:  # Gemma 1/2 refuse a system turn: hubforge folds it, as the Go template does
        return tokenizer.apply_chat_template(fold_system(messages), chat_template=template, tokenize=False,
                                             continue_final_message=True)


@pytest.mark.integration
@pytest.mark.parametrize("family", list(ollama.FAMILIES))
def test_go_renders_the_hf_prompt(family, tokenizer, render):
    # Ollama adds BOS itself (tokenizer.ggml.add_bos_token), so the Go template leaves out the BOS the HF one prints
    bos = tokenizer.bos_token
    template = trl_template(family)
    want = [ollama.hf_prompt(tokenizer, template, m).removeprefix(bos) for m in ollama.PROBE_CONVERSATIONS]
    assert any(m[0]["role"] == "system" for m in ollama.PROBE_CONVERSATIONS) and len(want) == 3
    assert render(ollama.FAMILIES[family].template, [list(m) for m in ollama.PROBE_CONVERSATIONS]) == want
    want = [hf_prefill(tokenizer, template, m).removeprefix(bos) for m in PREFILLS]
    assert render(ollama.FAMILIES[family].template, list(PREFILLS)) == want


@pytest.mark.integration
def test_ollama_joins_repeated_roles_and_the_template_follows(tokenizer, render):
    # Ollama's collate: two user turns in a row become one, joined by a blank line, before the template sees them
    split = [{"role": "user", "content": "First part."}, {"role": "user", "content": "Second part."}]
    joined = [{"role": "user", "content": "First part.\n\nSecond part."}]
    got = render(ollama.FAMILIES["gemma3"].template, [split])
    assert got == [ollama.hf_prompt(tokenizer, trl_template("gemma3"), joined).removeprefix(tokenizer.bos_token)]


@pytest.mark.unit
def test_params_carry_each_familys_end_of_turn_token():
    ends = {"gemma3": "<end_of_turn>", "gemma": "<end_of_turn>", "llama3": "<|eot_id|>", "llama3_1": "<|eot_id|>",
            "qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>"}
    assert set(ends) == set(ollama.FAMILIES)
    for family, end in ends.items():
        params = ollama.params(family)
        assert end in params["stop"] and json.loads(json.dumps(params)) == params
        assert end in ollama.FAMILIES[family].template  # the template closes turns with the token generation stops at


@pytest.mark.unit
def test_family_is_found_by_rendering_not_by_name(tokenizer, tmp_path):
    for name in ("gemma3", "llama3", "llama3_1", "qwen2_5", "qwen3"):
        assert ollama.family_of(tokenizer, trl_template(name)) == name
    # Gemma 2's template refuses system turns, hubforge folds them: it renders as Gemma 3 does
    assert ollama.FAMILIES[ollama.family_of(tokenizer, trl_template("gemma"))].template == ollama.GEMMA
    # the same markers with another text: Llama 3.2 prints today's date, a reworded Gemma template another layout
    assert ollama.family_of(tokenizer, (trl_templates_dir() / "llama3_2.jinja").read_text("utf-8")) is None
    assert ollama.family_of(tokenizer, trl_template("gemma3").replace("<end_of_turn>", "<end_of_turn>\n")) is None
    assert ollama.family_of(tokenizer, None) is None
    assert ollama.family_of(tokenizer, "{{ raise_exception('roles must alternate') }}") is None  # never a crash


@pytest.mark.unit
def test_files_are_written_for_a_known_family_and_removed_for_an_unknown_one(tokenizer, tmp_path):
    written = ollama.write_files(tmp_path, tokenizer, trl_template("qwen2_5"))
    assert written == {"family": "qwen2_5", "files": ["template", "params"], "stop": ["<|im_start|>", "<|im_end|>"]}
    assert (tmp_path / "template").read_text("utf-8") == ollama.QWEN2_5
    assert json.loads((tmp_path / "params").read_text("utf-8")) == {"stop": ["<|im_start|>", "<|im_end|>"]}
    unknown = ollama.write_files(tmp_path, tokenizer, "{{ messages[0]['content'] }}")
    assert unknown["family"] is None and unknown["files"] == [] and "Ollama guesses" in unknown["reason"]
    assert not (tmp_path / "template").exists() and not (tmp_path / "params").exists()


@pytest.mark.slow
def test_go_renders_the_embedded_gemma3_tokenizers_prompt(tmp_path):
    """The real Gemma 3 270M tokenizer (the embedded base, converted once and cached) through Go."""
    from ollama_render import go_renderer
    from transformers import AutoTokenizer

    from hubforge.base import fetch_embedded

    tokenizer = AutoTokenizer.from_pretrained(fetch_embedded())
    assert ollama.family_of(tokenizer, tokenizer.chat_template) == "gemma3"
    want = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True).removeprefix(tokenizer.bos_token)
            for m in ollama.PROBE_CONVERSATIONS]
    assert go_renderer(tmp_path)(ollama.GEMMA, [list(m) for m in ollama.PROBE_CONVERSATIONS]) == want
