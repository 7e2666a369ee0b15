"""Chat templates and the rules around them: which template, system-prompt folding, BOS exactly once.

The template is the base tokenizer's own; when it has none, the family's standard one that TRL ships
(`trl/chat_templates/<family>.jinja`), or the family the recipe names in `base.chat_template`. TRL later swaps in
the template's training variant (with `{% generation %}` markers) for assistant-only loss, and the tokenizer saved
next to the adapter keeps the plain one, which is what llama.cpp and the Space render at inference. TRL cannot patch
every template it ships (TRL 1.16: not `llama3_1`); for those hubforge ships the training variant in
`hubforge/chat_templates/` and `training_template` hands it over. `check_trainable` says, from the template text
alone (no model), whether training with assistant-only loss will accept a template.

    from hubforge.chat import load_tokenizer
    tokenizer, template = load_tokenizer(base_dir, "auto")
"""
from __future__ import annotations

import json
import re
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
OWN_TEMPLATES = Path(__file__).parent / "chat_templates"  # training variants TRL does not ship: <file stem>_training.jinja


@dataclass(frozen=True)
class ChatTemplate:
    text: str | None  # None: no template (plain-text data on a base without one)
    family: str | None
    source: str  # "tokenizer" or "trl:<file>"
    system_fold: str  # "none" (native system turn), "template" (the template folds it) or "hubforge" (we fold it)

    def describe(self) -> dict:
        return {"family": self.family, "source": self.source, "system_role": self.system_fold == "none",
                "system_prompt_folded_by": None if self.system_fold == "none" else self.system_fold}


def trl_installed() -> bool:
    """Whether TRL is importable here (the slim pull-request job installs only what validate and plan need)."""
    import importlib.util

    try:
        return importlib.util.find_spec("trl") is not None
    except ModuleNotFoundError:
        return False


def trl_templates_dir() -> Path:
    """TRL's chat_templates folder, found without importing TRL (seconds; `plan` must stay quick)."""
    import importlib.util

    return Path(importlib.util.find_spec("trl").origin).parent / "chat_templates"


def has_generation_markers(template: str) -> bool:
    """TRL 1.16's own test (trl.chat_template_utils.has_generation_markers), whitespace-trim variants included."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def trl_template(family: str) -> str:
    return (trl_templates_dir() / TRL_TEMPLATES[family]).read_text("utf-8")


def training_support(text: str) -> str:
    """How assistant-only training gets a `{% generation %}`-marked variant of `text`: "markers" (it has them),
    "trl:<file>" (TRL patches it itself: TRL pairs its `<name>.jinja` with `<name>_training.jinja` by exact text),
    "hubforge:<file>" (we ship the variant). Raises ValueError when there is none, as TRL's trainer would."""
    if has_generation_markers(text):
        return "markers"
    trl_dir = trl_templates_dir()
    for plain in sorted(trl_dir.glob("*.jinja")):
        source = plain.read_text("utf-8")
        if source == text and (trl_dir / f"{plain.stem}_training.jinja").is_file():
            return f"trl:{plain.stem}_training.jinja"
        # ours also match a copy that differs in surrounding whitespace (a tokenizer_config.json round trip)
        if source.strip() == text.strip() and (OWN_TEMPLATES / f"{plain.stem}_training.jinja").is_file():
            return f"hubforge:{plain.stem}_training.jinja"
    raise ValueError("the chat template has no `{% generation %}` markers and neither TRL nor hubforge has a training "
                     "variant of it, so assistant-only loss cannot mask it")


def training_template(text: str) -> str | None:
    """The template to put on the tokenizer while training with assistant-only loss; None: TRL handles `text`."""
    support = training_support(text)
    return (OWN_TEMPLATES / support.split(":", 1)[1]).read_text("utf-8") if support.startswith("hubforge:") else None


def check_trainable(choice: str, text: str | None, family: str | None = None) -> str | None:
    """None when training with assistant-only loss accepts the template; else a message naming the recipe fields."""
    if text is None:
        return None
    try:
        training_support(text)
    except ValueError as exc:
        which = f"base.chat_template {choice!r}" + (f" (family {family})" if family else "")
        return (f"{which}: {exc}. Set base.chat_template to one of {', '.join(TRL_TEMPLATES)}, or "
                "train.assistant_only_loss: false to train on every token")
    return None


def recipe_template_problem(recipe) -> str | None:
    """`check_trainable` for a recipe before anything is downloaded or loaded (plan, pipeline preflight): the named
    template, or with `auto` a local base's own template (its tokenizer files) else its family's standard one.
    None also when that cannot be known yet (`auto` on a Hub base not on disk): the train stage checks it then."""
    if not recipe.train.assistant_only_loss or recipe.data.format == "text":
        return None
    choice, model = recipe.base.chat_template, recipe.base.model
    if choice != "auto":
        return check_trainable(choice, trl_template(choice), choice)
    if model.startswith("embedded:"):  # the packaged GGUF has no template: its family's standard one is used
        from hubforge.base import KNOWN_BASES

        family = (KNOWN_BASES.get(model) or {}).get("family")
        return check_trainable(choice, trl_template(family), family) if family in TRL_TEMPLATES else None
    if not model.startswith((".", "/")) or not (recipe.local_path(model) / "config.json").is_file():
        return None
    folder = recipe.local_path(model)
    own = (folder / "chat_template.jinja").read_text("utf-8") if (folder / "chat_template.jinja").is_file() else None
    if own is None and (folder / "tokenizer_config.json").is_file():
        own = json.loads((folder / "tokenizer_config.json").read_text("utf-8")).get("chat_template")
    model_type = json.loads((folder / "config.json").read_text("utf-8")).get("model_type")
    text, family, _source = pick_template(choice, own if isinstance(own, str) else None, model_type)
    return check_trainable(choice, text, family)


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
