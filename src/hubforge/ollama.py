"""What Ollama reads from a GGUF repo on the Hub: a `template` file (Go text/template) and a `params` file (JSON
with the stop tokens), for each chat-template family a recipe may name.

    from hubforge import ollama
    ollama.write_files(out_dir, tokenizer, tokenizer.chat_template)   # -> {"family", "files", "stop"}

`ollama run hf.co/<repo>:<QUANT>` uses the repo's `template` and `params` when present, else guesses a template
from the GGUF's `tokenizer.chat_template` (Hub docs: ollama.md). The Go templates below are written against
Ollama's data model: `.Messages` ([{Role, Content}], consecutive turns of one role joined by a blank line, system
turns included; Ollama also passes `.System`, every system turn joined, but like the HF templates these read the
leading system turn from the messages), with text/template's builtins (`slice`, `len`, `index`, `eq`, `and`, `or`,
`not`). They leave out BOS: Ollama's tokenizer adds it (`tokenizer.ggml.add_bos_token`), so what
they render is the HF template's prompt without its leading BOS text. A final assistant turn is left open (a
prefill, as Ollama's own templates do); otherwise the assistant header follows, as `add_generation_prompt` does.
Go's text/template has no `trim`, so a turn with leading or trailing whitespace keeps it in Ollama where Gemma's
and Llama's HF templates strip it. tests/test_ollama.py renders these templates with Go itself.

Which family a model's template belongs to is decided by rendering, not by name: the first family whose standard
template (TRL's, which hubforge trains with) renders PROBE_CONVERSATIONS to the very same prompts. A template that
matches none (e.g. Llama 3.2's, which prints today's date) gets no files, and Ollama falls back to its own guess.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Rendered through the template of the model and of each family; the tests render them with Go as well.
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "system", "content": "You are a concise assistant.\nAnswer in one sentence."},
     {"role": "user", "content": "سلام! حالت چطور است؟"},
     {"role": "assistant", "content": "خوبم، ممنون."},
     {"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "İstanbul'da hava nasıl?"},
     {"role": "assistant", "content": "Ilık ve güneşli.\n\nBaşka bir şey?"},
     {"role": "user", "content": "Say \"{{ .Content }}\" & <b>stop</b>."}],
)

# Turn bookkeeping shared by every template: $last is the final message; the first message, when a system turn,
# is placed by each family's own header instead of in the loop.
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
_FIRST_SYSTEM = '(eq (index $.Messages 0).Role "system")'
_OPENS_WITH_SYSTEM = 'and .Messages (eq (index .Messages 0).Role "system")'

GEMMA = ("{{- range $i, $_ := .Messages }}\n" + _LAST + """
{{- if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- else if not (and (eq $i 0) (eq .Role "system")) }}<start_of_turn>{{ .Role }}
{{ if and (eq $i 1) """ + _FIRST_SYSTEM + """ }}{{ (index $.Messages 0).Content }}

{{ end }}{{ .Content }}<end_of_turn>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<start_of_turn>model
{{ end }}
{{- end }}""")

# Llama 3 and 3.1 turns; 3.1 always opens with a system header that carries the knowledge and (fixed) date lines.
_LLAMA_TURNS = ("{{- range $i, $_ := .Messages }}\n" + _LAST + """
{{- if not (and (eq $i 0) (eq .Role "system") $header) }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}""")
LLAMA3 = "{{- $header := false }}\n" + _LLAMA_TURNS
LLAMA3_1 = ("""{{- $header := true }}<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ if """ + _OPENS_WITH_SYSTEM + """ }}{{ (index .Messages 0).Content }}{{ end }}<|eot_id|>
""" + _LLAMA_TURNS)

# ChatML (Qwen): Qwen 2.5 puts its default system turn in when the conversation has none, Qwen 3 does not, and Qwen 3
# opens a final (prefilled) assistant turn with an empty thinking block, as its HF template does.
def _chatml_turns(prefill: str = "") -> str:
    return ("{{- range $i, $_ := .Messages }}\n" + _LAST + """
{{- if not (and (eq $i 0) (eq .Role "system")) }}<|im_start|>{{ .Role }}
""" + prefill + """{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}""")


_QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2_5 = ("<|im_start|>system\n{{ if " + _OPENS_WITH_SYSTEM + " }}"
           "{{ (index .Messages 0).Content }}{{ else }}" + _QWEN_DEFAULT_SYSTEM + '{{ end }}<|im_end|>{{ "\\n" }}\n'
           + _chatml_turns())
QWEN3 = ("{{- if " + _OPENS_WITH_SYSTEM + " }}<|im_start|>system\n"
         "{{ (index .Messages 0).Content }}<|im_end|>\n{{ end }}\n"
         + _chatml_turns('{{ if and $last (eq .Role "assistant") }}<think>\n\n</think>\n\n{{ end }}'))

@dataclass(frozen=True)
class Family:
    template: str                 # the Go template Ollama renders
    stop: tuple[str, ...]         # params.stop: the turn markers, so generation ends with the turn


GEMMA_STOP, LLAMA3_STOP, CHATML_STOP = (("<start_of_turn>", "<end_of_turn>"),
                                        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                                        ("<|im_start|>", "<|im_end|>"))
# keyed by hubforge.chat.TRL_TEMPLATES names (base.chat_template); Gemma 1/2 render as Gemma 3 once the system turn
# is folded into the first user turn, which hubforge does for them and this template does for Ollama
FAMILIES: dict[str, Family] = {
    "gemma3": Family(GEMMA, GEMMA_STOP), "gemma": Family(GEMMA, GEMMA_STOP),
    "llama3_1": Family(LLAMA3_1, LLAMA3_STOP), "llama3": Family(LLAMA3, LLAMA3_STOP),
    "qwen2_5": Family(QWEN2_5, CHATML_STOP), "qwen3": Family(QWEN3, CHATML_STOP),
}


def hf_prompt(tokenizer, template: str, messages: list[dict]) -> str:
    """The HF prompt for `messages` with add_generation_prompt, the system turn folded into the first user turn
    when the template refuses one (Gemma 1/2), as hubforge.chat.for_template does in training."""
    from hubforge.chat import fold_system

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja2 TemplateError from raise_exception("System role not supported")
        if messages[0]["role"] != "system":
            raise
        return tokenizer.apply_chat_template(fold_system(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=True)


def family_of(tokenizer, template: str | None) -> str | None:
    """The FAMILIES entry whose standard template renders PROBE_CONVERSATIONS exactly as `template` does, or None."""
    from hubforge.chat import trl_template

    if not template:
        return None
    try:
        want = [hf_prompt(tokenizer, template, m) for m in PROBE_CONVERSATIONS]
    except Exception:  # a template that cannot render a plain conversation is no family's
        return None
    for name in FAMILIES:
        if [hf_prompt(tokenizer, trl_template(name), m) for m in PROBE_CONVERSATIONS] == want:
            return name
    return None


def params(family: str) -> dict:
    """The `params` file's content: Ollama's generation options for this family (its stop strings)."""
    return {"stop": list(FAMILIES[family].stop)}


def write_files(out_dir: Path, tokenizer, template: str | None) -> dict:
    """Write `template` and `params` into `out_dir` for the family `template` renders like; returns {family, files
    (names written), stop}, or {family: None, files: [], reason} when no family renders like it."""
    name = family_of(tokenizer, template)
    for stale in ("template", "params"):  # a former run's files must not outlive the template they were made for
        (Path(out_dir) / stale).unlink(missing_ok=True)
    if name is None:
        reason = ("the model has no chat template" if not template else "its chat template renders like none of "
                  f"{', '.join(FAMILIES)}; Ollama guesses a template from the GGUF's tokenizer.chat_template")
        return {"family": None, "files": [], "reason": reason}
    (Path(out_dir) / "template").write_text(FAMILIES[name].template, "utf-8")
    (Path(out_dir) / "params").write_text(json.dumps(params(name), indent=2) + "\n", "utf-8")
    return {"family": name, "files": ["template", "params"], "stop": list(FAMILIES[name].stop)}
