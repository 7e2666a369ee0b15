"""Row converters: one dataset row in a recipe's `data.format` -> one processed training row.

Chat-like formats (messages, alpaca, squad) become `{"messages": [{"role", "content"}, ...]}`; squad rows also
carry `"qa"` (id, context, question, answers) for the QA metrics; `text` becomes `{"text": ...}`. A row that cannot
be used raises `Skip(reason)`; the data stage counts the reasons and writes them to the manifest.

    from hubforge.formats import column_map, check_columns, convert
"""
from __future__ import annotations

import json

# Fields each format reads (the dataset column names default to these; data.columns remaps them).
REQUIRED = {"messages": ("messages",), "alpaca": ("instruction", "output"), "squad": ("context", "question", "answers"),
            "text": ("text",)}
OPTIONAL = {"messages": ("system",), "alpaca": ("input", "system"), "squad": ("id", "system"), "text": ()}
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}


class Skip(Exception):
    """A row that is skipped; `reason` is the counter it lands in."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def column_map(fmt: str, columns: dict) -> dict[str, str]:
    """Format field -> dataset column, for the fields this format reads."""
    return {f: columns.get(f, f) for f in REQUIRED[fmt] + OPTIONAL[fmt]}


def check_columns(fmt: str, mapping: dict[str, str], present: list[str]) -> str | None:
    """None when every required column exists, else a message naming what is missing and what exists."""
    missing = [f"{mapping[f]!r}" + (f" (for {f})" if mapping[f] != f else "") for f in REQUIRED[fmt] if mapping[f] not in present]
    if not missing:
        return None
    needs = ", ".join(REQUIRED[fmt])
    return (f"data.format {fmt!r} needs the fields {needs}; column(s) {', '.join(missing)} not found. The dataset has "
            f"columns: {', '.join(map(str, present)) or '(none)'}. Map them with data.columns, e.g. "
            f"data.columns: {{{REQUIRED[fmt][0]}: <column>}}")


def squad_prompt(context: str, question: str) -> str:
    """The user turn of a squad row (shared with the evaluate stage so QA prompts match training)."""
    return f"{context}\n\n{question}"


def _text(value, field: str) -> str:
    if value is None:
        raise Skip(f"missing_{field}")
    if not isinstance(value, str):
        raise Skip(f"malformed_{field}")
    if not value.strip():
        raise Skip(f"empty_{field}")
    return value.strip()


def _maybe_json(value):
    # CSV cells hold nested structures (messages, answers) as JSON text
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def _messages(value) -> list[dict]:
    value = _maybe_json(value)
    if value is None:
        raise Skip("missing_messages")
    if not isinstance(value, list) or not value:
        raise Skip("malformed_messages")
    out = []
    for turn in value:
        if not isinstance(turn, dict):
            raise Skip("malformed_messages")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = ROLE_ALIASES.get(role, role)
        if role not in ("system", "user", "assistant"):
            raise Skip("unknown_role")
        out.append({"role": role, "content": _text(content, "content")})
    body = out[1:] if out[0]["role"] == "system" else out
    if any(t["role"] != ("user", "assistant")[i % 2] for i, t in enumerate(body)):
        raise Skip("roles_not_alternating")  # also catches a second system turn
    if not body or body[-1]["role"] != "assistant":
        raise Skip("no_final_assistant_turn")
    return out


def _answers(value) -> dict:
    value = _maybe_json(value)
    if isinstance(value, list):  # [{"text", "answer_start"}, ...]
        value = {"text": [a.get("text") for a in value if isinstance(a, dict)],
                 "answer_start": [a.get("answer_start", -1) for a in value if isinstance(a, dict)]}
    if not isinstance(value, dict) or not isinstance(value.get("text"), list):
        raise Skip("malformed_answers")
    texts = [t.strip() for t in value["text"] if isinstance(t, str) and t.strip()]
    starts = list(value.get("answer_start") or [-1] * len(texts))[: len(texts)]
    return {"text": texts, "answer_start": [int(s) for s in starts]}


def convert(fmt: str, row: dict, mapping: dict[str, str], *, system_prompt: str | None, no_answer_text: str,
            index: int = 0) -> dict:
    """One raw row -> one processed row (raises Skip)."""
    get = lambda field: row.get(mapping[field])  # noqa: E731
    system = get("system") if "system" in mapping and isinstance(get("system"), str) and get("system").strip() else system_prompt
    if fmt == "text":
        return {"text": _text(get("text"), "text")}
    if fmt == "messages":
        return {"messages": _with_system(_messages(get("messages")), system)}
    if fmt == "alpaca":
        instruction, extra = _text(get("instruction"), "instruction"), get("input")
        user = instruction if not (isinstance(extra, str) and extra.strip()) else f"{instruction}\n\n{extra.strip()}"
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(get("output"), "output")}]
        return {"messages": _with_system(turns, system)}
    if fmt == "squad":
        context, question = _text(get("context"), "context"), _text(get("question"), "question")
        answers = _answers(get("answers"))
        reply = answers["text"][0] if answers["text"] else no_answer_text  # unanswerable: the fixed no-answer phrase
        turns = [{"role": "user", "content": squad_prompt(context, question)}, {"role": "assistant", "content": reply}]
        qa_id = get("id") if get("id") not in (None, "") else f"row-{index}"
        return {"messages": _with_system(turns, system),
                "qa": {"id": str(qa_id), "context": context, "question": question, "answers": answers}}
    raise ValueError(f"unknown data.format {fmt!r}")
