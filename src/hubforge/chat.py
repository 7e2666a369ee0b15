"""Chat templates and the rules around them: which template, system-prompt folding, BOS exactly once.

The template is the base tokenizer's own; when it has none, the family's standard one that TRL ships
(`trl/chat_templates/<family>.jinja`), or the family the recipe names in `base.chat_template`. TRL later swaps in
the template's training variant (with `{% generation %}` markers) for assistant-only loss, and the tokenizer saved
next to the adapter keeps the plain one, which is what llama.cpp and the Space render at inference.

    from hubforge.chat import load_tokenizer
    tokenizer, template = load_tokenizer(base_dir, "auto")
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# base.chat_template name -> TRL template file
TRL_TEMPLATES = {"gemma": "gemma.jinja", "gemma3": "gemma3.jinja", "llama3": "llama3.jinja", "llama3_1": "llama3_1.jinja",
                 "qwen2_5": "qwen2_5.jinja", "qwen3": "qwen3.jinja"}
# config.json model_type -> template family
MODEL_TYPE_FAMILY = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma3", "gemma3_text": "gemma3",
                     "llama": "llama3", "qwen2": "qwen2_5", "qwen3": "qwen3"}
# Families whose models were never trained with a system role: the system prompt goes into the first user turn.
NO_SYSTEM_ROLE = {"gemma", "gemma3"}
_PROBE_SYSTEM, _PROBE_USER = "HUBFORGE-SYSTEM-PROBE", "HUBFORGE-USER-PROBE"


@dataclass(frozen=True)
class ChatTemplate:
    text: str | None  # None: no template (plain-text data on a base without one)
    family: str | None
    source: str  # "tokenizer" or "trl:<file>"
    system_fold: str  # "none" (native system turn), "template" (the template folds it) or "hubforge" (we fold it)

    def describe(self) -> dict:
        return {"family": self.family, "source": self.source, "system_role": self.system_fold == "none",
                "system_prompt_folded_by": None if self.system_fold == "none" else self.system_fold}


def trl_template(family: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / TRL_TEMPLATES[family]).read_text("utf-8")


def family_of(model_type: str | None) -> str | None:
    return MODEL_TYPE_FAMILY.get(model_type or "")


def pick_template(choice: str, own: str | None, model_type: str | None) -> tuple[str | None, str | None, str]:
    """(template text, family, source) for base.chat_template `choice` given the tokenizer's own template."""
    family = family_of(model_type)
    if choice != "auto":
        return trl_template(choice), choice, f"trl:{TRL_TEMPLATES[choice]}"
    if own:
        return own, family, "tokenizer"
    if family in TRL_TEMPLATES:
        return trl_template(family), family, f"trl:{TRL_TEMPLATES[family]}"
    return None, family, "none"


def system_fold(tokenizer, template: str, family: str | None) -> str:
    """How a system turn is handled: rendered natively, folded by the template itself, or folded by hubforge."""
    probe = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception:  # e.g. Gemma 1/2: raise_exception("System role not supported")
        return "hubforge"
    if _PROBE_SYSTEM not in text:
        return "hubforge"
    return "template" if family in NO_SYSTEM_ROLE else "none"


def fold_system(messages: list[dict]) -> list[dict]:
    """[system, user, ...] -> [user(system + blank line + user), ...], as Gemma 3's own template does."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
    else:
        rest.insert(0, {"role": "user", "content": system})
    return rest


def load_tokenizer(base_dir: Path, choice: str = "auto", need_template: bool = True):
    """The base tokenizer with the chosen chat template set on it, and a description of that template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = json.loads((Path(base_dir) / "config.json").read_text("utf-8"))
    text, family, source = pick_template(choice, tokenizer.chat_template, config.get("model_type"))
    if text is None and need_template:
        raise ValueError(f"the base model has no chat template and its family ({config.get('model_type')!r}) has no "
                         f"standard one; set base.chat_template to one of {', '.join(TRL_TEMPLATES)}")
    tokenizer.chat_template = text
    fold = system_fold(tokenizer, text, family) if text else "none"
    return tokenizer, ChatTemplate(text=text, family=family, source=source, system_fold=fold)


def for_template(row: dict, template: ChatTemplate) -> dict:
    """The row as the tokenizer should see it (system folded when the template cannot render one)."""
    if "messages" in row and template.system_fold == "hubforge":
        return {**row, "messages": fold_system(row["messages"])}
    return row


def token_ids(tokenizer, row: dict, template: ChatTemplate) -> list[int]:
    """Tokens of one processed row exactly as TRL's SFTTrainer builds them (chat template, or text + EOS)."""
    row = for_template(row, template)
    if "messages" in row:
        return list(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
    text = row["text"] if row["text"].endswith(tokenizer.eos_token) else row["text"] + tokenizer.eos_token
    return list(tokenizer(text=text)["input_ids"])


def bos_problem(ids: list[int], bos_id: int | None) -> str | None:
    """None when BOS appears exactly once, at the start (or never, for tokenizers without one); else what is wrong."""
    if bos_id is None:
        return None
    count = sum(1 for i in ids if i == bos_id)
    if count == 1 and ids[0] == bos_id:
        return None
    if count == 0:
        return "no <bos> token: neither the chat template nor the tokenizer adds it"
    if count > 1:
        return (f"<bos> appears {count} times: the chat template emits it and the tokenizer adds it again "
                "(render with tokenize=True, or tokenize the rendered text with add_special_tokens=False)")
    return "<bos> is not the first token"
