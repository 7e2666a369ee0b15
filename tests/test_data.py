"""Data stage, row formats and chat-template rules (unit tier: a real tiny SentencePiece tokenizer, no model).

    .venv/bin/python -m pytest tests/test_data.py -q -p no:cacheprovider
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hubforge import chat, formats
from hubforge.datarows import read_rows
from hubforge.pipeline import StageError
from hubforge.recipe import resolve
from hubforge.rundir import RunDir
from hubforge.stages import data

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).parent / "fixtures" / "data"
NO_ANSWER = "پاسخی در متن نیست."


def convert(fmt, row, columns=None, system=None):
    return formats.convert(fmt, row, formats.column_map(fmt, columns or {}), system_prompt=system, no_answer_text=NO_ANSWER)


def skip_reason(fmt, row, columns=None):
    with pytest.raises(formats.Skip) as info:
        convert(fmt, row, columns)
    return info.value.reason


# ---------------------------------------------------------------- formats
def test_messages_keeps_turns_and_adds_the_recipe_system_prompt():
    row = {"messages": [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello"}]}
    out = convert("messages", row, system="Be brief.")
    assert out == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]}
    own = {"messages": [{"role": "system", "content": "Own."}] + row["messages"]}
    assert convert("messages", own, system="Be brief.")["messages"][0]["content"] == "Own."  # the row's own wins


def test_messages_accepts_sharegpt_turns_and_json_text():
    row = {"conv": json.dumps([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])}
    assert convert("messages", row, {"messages": "conv"})["messages"] == [{"role": "user", "content": "q"},
                                                                        {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("messages, reason", [
    (None, "missing_messages"),
    ("not a list", "malformed_messages"),
    ([], "malformed_messages"),
    ([{"role": "user", "content": "q"}], "no_final_assistant_turn"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "roles_not_alternating"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "roles_not_alternating"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty_content"),
    ([{"role": "user", "content": "q"}, {"role": "narrator", "content": "a"}], "unknown_role"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "malformed_content"),
])
def test_bad_messages_are_skipped_with_a_reason(messages, reason):
    assert skip_reason("messages", {"messages": messages}) == reason


def test_alpaca_joins_instruction_and_input():
    cols = {"input": "context", "output": "response"}
    with_input = convert("alpaca", {"instruction": "Translate", "context": "good morning", "response": "صبح بخیر"}, cols)
    assert with_input["messages"] == [{"role": "user", "content": "Translate\n\ngood morning"},
                                      {"role": "assistant", "content": "صبح بخیر"}]
    assert convert("alpaca", {"instruction": "Say hi", "response": "hi"}, cols)["messages"][0]["content"] == "Say hi"
    assert skip_reason("alpaca", {"instruction": "x", "response": ""}, cols) == "empty_output"
    assert skip_reason("alpaca", {"instruction": "x", "response": 42}, cols) == "malformed_output"


def test_squad_answerable_unanswerable_and_qa_record():
    ok = convert("squad", {"id": "q1", "context": "C", "question": "Q", "answers": {"text": ["A", "B"], "answer_start": [0, 2]}})
    assert ok["messages"] == [{"role": "user", "content": formats.squad_prompt("C", "Q")}, {"role": "assistant", "content": "A"}]
    assert ok["qa"] == {"id": "q1", "context": "C", "question": "Q", "answers": {"text": ["A", "B"], "answer_start": [0, 2]}}
    none = convert("squad", {"context": "C", "question": "Q", "answers": json.dumps({"text": [], "answer_start": []})})
    assert none["messages"][-1]["content"] == NO_ANSWER  # unanswerable trains the fixed no-answer phrase
    assert none["qa"]["answers"] == {"text": [], "answer_start": []} and none["qa"]["id"] == "row-0"
    assert skip_reason("squad", {"context": "C", "question": "Q", "answers": "nope"}) == "malformed_answers"
    assert skip_reason("squad", {"context": "", "question": "Q", "answers": {"text": []}}) == "empty_context"


def test_text_format():
    assert convert("text", {"body": " Hello "}, {"text": "body"}) == {"text": "Hello"}
    assert skip_reason("text", {"text": ""}) == "empty_text"


def test_missing_column_names_existing_columns_and_what_the_format_needs():
    message = formats.check_columns("alpaca", formats.column_map("alpaca", {"output": "answer"}), ["instruction", "response"])
    assert "'answer' (for output)" in message and "instruction, response" in message and "instruction, output" in message
    assert formats.check_columns("alpaca", formats.column_map("alpaca", {}), ["instruction", "output"]) is None


# ---------------------------------------------------------------- split, sample, fit
def test_holdout_is_deterministic_disjoint_and_seeded():
    rows = list(range(100))
    train, held = data.holdout(rows, 0.1, seed=7)
    assert data.holdout(rows, 0.1, seed=7) == (train, held)
    assert len(held) == 10 and sorted(train + held) == rows and train == sorted(train)
    assert data.holdout(rows, 0.1, seed=8)[1] != held
    assert data.holdout([1, 2], 0.1, 0)[1] != [] and data.holdout([1], 0.1, 0) == ([1], [])


def test_subsample_fraction_then_cap():
    rows = list(range(100))
    assert len(data.subsample(rows, 0.25, None, 1)) == 25
    assert len(data.subsample(rows, 0.25, 10, 1)) == 10
    assert data.subsample(rows, 0.25, 10, 1) == data.subsample(rows, 0.25, 10, 1)
    assert data.subsample(rows, 1.0, None, 1) is rows


def chars(row):  # a stand-in token counter: one token per character
    return len(row["text"]) if "text" in row else sum(len(m["content"]) for m in row["messages"])


def test_fit_truncates_or_drops_as_the_recipe_says():
    assert data.fit({"text": "x" * 10}, chars, 20, "truncate") == ({"text": "x" * 10}, "ok")
    assert data.fit({"text": "x" * 30}, chars, 20, "truncate") == ({"text": "x" * 20}, "truncated")
    assert data.fit({"text": "x" * 30}, chars, 20, "drop") == (None, "dropped")
    multi = {"messages": [{"role": "user", "content": "u" * 5}, {"role": "assistant", "content": "a" * 5},
                          {"role": "user", "content": "u" * 5}, {"role": "assistant", "content": "a" * 5}]}
    fitted, status = data.fit(multi, chars, 12, "truncate")
    assert status == "truncated" and fitted["messages"] == multi["messages"][:2]  # later exchange dropped first
    fitted, status = data.fit(multi, chars, 8, "truncate")
    assert status == "truncated" and fitted["messages"][1]["content"] == "aaa"  # then the reply is shortened
    assert data.fit(multi, chars, 5, "truncate") == (None, "dropped")  # the prompt alone does not fit
    qa = {**multi, "qa": {}}
    assert data.fit(qa, chars, 12, "truncate") == (None, "dropped")  # a cut answer would be a wrong answer


def test_read_file_formats(tmp_path):
    rows, bad = read_rows(FIXTURES / "alpaca.jsonl")
    assert len(rows) == 7 and len(bad) == 2
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}), "utf-8")
    assert read_rows(tmp_path / "a.json") == ([{"text": "a"}, {"text": "b"}], [])
    rows, _ = read_rows(FIXTURES / "text.csv")
    assert [r["text"] for r in rows] == ["The first document, with a comma.", "", "Second document."]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "p1"}, {"text": "p2"}]), tmp_path / "t.parquet")
    assert read_rows(tmp_path / "t.parquet") == ([{"text": "p1"}, {"text": "p2"}], [])
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(StageError, match="unsupported file type"):
        read_rows(tmp_path / "x.txt")


def test_bad_records_are_named_by_file_and_line_and_bad_utf8_stops_with_the_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\nnot json\n\n[1, 2]\n' + "[" * 100_000 + "\n", "utf-8")
    rows, bad = read_rows(tmp_path / "a.jsonl", "data/a.jsonl")
    assert rows == [{"text": "ok"}]
    assert bad == ["data/a.jsonl:2: not JSON (Expecting value at column 1)", "data/a.jsonl:4: a JSON list, not an object",
                   "data/a.jsonl:5: not JSON (nested too deeply)"]
    (tmp_path / "b.csv").write_bytes(b"text\nfine\nbro\xffken\n")
    with pytest.raises(StageError, match=r"^data.files: data/b.csv:3: not UTF-8 \(byte 0xff at offset 13\); save the file as UTF-8$"):
        read_rows(tmp_path / "b.csv", "data/b.csv")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(StageError, match="data/c.parquet: not a readable Parquet file"):
        read_rows(tmp_path / "c.parquet", "data/c.parquet")


# ---------------------------------------------------------------- tokenizer-level rules (real tiny SentencePiece)
@pytest.fixture(scope="module")
def tok_base(tmp_path_factory):
    """A base folder with only a tokenizer (Gemma layout + Gemma 3 template) and a config naming the model type."""
    from tiny_model import train_tokenizer  # tests/fixtures, on sys.path via conftest
    from transformers import AutoTokenizer

    dest = tmp_path_factory.mktemp("tok-base")
    train_tokenizer(dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    tokenizer.chat_template = chat.trl_template("gemma3")
    tokenizer.save_pretrained(dest)
    (dest / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}), "utf-8")
    return dest


def test_template_choice_rules():
    own = "{{ messages }}"
    assert chat.pick_template("auto", own, "gemma3_text")[1:] == ("gemma3", "tokenizer")
    text, family, source = chat.pick_template("auto", None, "gemma3_text")
    assert text == chat.trl_template("gemma3") and source == "trl:gemma3.jinja"
    assert chat.pick_template("llama3_1", own, "gemma3_text")[2] == "trl:llama3_1.jinja"  # a named family overrides
    assert chat.pick_template("auto", None, "mystery")[0] is None


def test_system_prompt_folding(tok_base):
    tokenizer, template = chat.load_tokenizer(tok_base)
    assert template.system_fold == "template" and template.describe()["system_role"] is False  # Gemma 3 folds itself
    assert chat.system_fold(tokenizer, chat.trl_template("gemma"), "gemma") == "hubforge"  # Gemma 1/2 raise on system
    assert chat.system_fold(tokenizer, chat.trl_template("llama3"), "llama3") == "none"
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    assert chat.fold_system(row["messages"])[0] == {"role": "user", "content": "S\n\nU"}
    # Folding by hubforge renders exactly what Gemma 3's template renders from a system turn.
    ours = tokenizer.apply_chat_template(chat.fold_system(row["messages"]), tokenize=False)
    assert ours == tokenizer.apply_chat_template(row["messages"], tokenize=False)
    gemma2 = chat.ChatTemplate(chat.trl_template("gemma"), "gemma", "trl:gemma.jinja", "hubforge")
    tokenizer.chat_template = gemma2.text
    ids = chat.token_ids(tokenizer, row, gemma2)  # would raise "System role not supported" without folding
    assert tokenizer.decode(ids).count("S\n\nU") == 1


def test_bos_exactly_once_and_the_doubled_bos_bug_is_caught(tok_base):
    tokenizer, template = chat.load_tokenizer(tok_base)
    bos = tokenizer.bos_token_id
    row = {"messages": [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود"}]}
    ids = chat.token_ids(tokenizer, row, template)
    assert chat.bos_problem(ids, bos) is None and ids.count(bos) == 1
    text_ids = chat.token_ids(tokenizer, {"text": "سلام دنیا"}, template)
    assert chat.bos_problem(text_ids, bos) is None and text_ids[-1] == tokenizer.eos_token_id
    # The classic Gemma bug: render the template (which writes <bos>), then tokenize with special tokens added.
    doubled = tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False))["input_ids"]
    assert "2 times" in chat.bos_problem(doubled, bos)
    assert "no <bos>" in chat.bos_problem(ids[1:], bos)
    assert chat.bos_problem(ids[1:], None) is None  # tokenizers without a BOS (Qwen) need none


# ---------------------------------------------------------------- the stage
@pytest.fixture
def project(tmp_path, tok_base):
    shutil.copytree(tok_base, tmp_path / "base")
    shutil.copytree(FIXTURES, tmp_path / "data")

    def make(data_section: dict, train: dict | None = None):
        raw = {"name": "data-test", "base": {"model": "./base"}, "data": data_section, "method": {"name": "lora"},
               "train": {"max_length": 64, **(train or {})}}
        return resolve(raw, root=tmp_path, source="<test>"), RunDir.open(tmp_path / "run")

    return make


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_stage_counts_skips_writes_rows_and_fingerprints(project):
    recipe, run_dir = project({"files": ["data/alpaca.jsonl"], "format": "alpaca", "eval_fraction": 0.25,
                               "columns": {"input": "context", "output": "response"}})
    result = data.run(recipe, run_dir)
    assert result["skipped"] == {"empty_instruction": 1, "empty_output": 1, "invalid_record": 2, "malformed_output": 1}
    assert len(result["skipped_examples"]) == 2 and all(e.startswith("data/alpaca.jsonl:") for e in result["skipped_examples"])
    assert (result["rows_train"], result["rows_eval"]) == (3, 1)
    train = rows_of(run_dir.path / "data" / "train.jsonl")
    assert len(train) == 3 and all(r["messages"][-1]["role"] == "assistant" for r in train)
    assert result["source"]["files"][0]["path"] == "data/alpaca.jsonl" and len(result["source"]["files"][0]["sha256"]) == 64
    assert result["chat_template"]["family"] == "gemma3" and result["fingerprint"] == data.run(recipe, run_dir)["fingerprint"]
    reseeded, _ = project({"files": ["data/alpaca.jsonl"], "format": "alpaca", "eval_fraction": 0.25,
                           "columns": {"input": "context", "output": "response"}}, {"seed": 1})
    assert data.run(reseeded, run_dir)["fingerprint"] != result["fingerprint"]


def test_stage_squad_and_messages(project):
    recipe, run_dir = project({"files": ["data/squad.jsonl"], "format": "squad", "eval_fraction": 0.3})
    result = data.run(recipe, run_dir)
    assert result["skipped"] == {"empty_context": 1, "malformed_answers": 1}
    rows = rows_of(run_dir.path / "data" / "train.jsonl") + rows_of(run_dir.path / "data" / "eval.jsonl")
    assert {r["qa"]["id"] for r in rows} == {"q1", "q2", "q3"}
    assert next(r for r in rows if r["qa"]["id"] == "q2")["messages"][-1]["content"] == NO_ANSWER
    recipe, run_dir = project({"files": ["data/messages.jsonl"], "format": "messages"})
    result = data.run(recipe, run_dir)
    assert result["rows_train"] + result["rows_eval"] == 3 and sum(result["skipped"].values()) == 6
    assert result["skipped"]["missing_messages"] == 1 and result["skipped"]["roles_not_alternating"] == 1


def test_too_long_rows_are_truncated_or_dropped_and_counted(project, persian_chat_file, tmp_path):
    (tmp_path / "data" / "chat.jsonl").write_bytes(persian_chat_file.read_bytes())
    truncated = data.run(*project({"files": ["data/chat.jsonl"], "format": "messages"}, {"max_length": 40}))
    dropped = data.run(*project({"files": ["data/chat.jsonl"], "format": "messages", "too_long": "drop"}, {"max_length": 40}))
    assert truncated["truncated"] > 0 and truncated["tokens"]["train_max"] <= 40
    # every over-long row is counted once: truncated, or dropped when even its prompt does not fit
    assert dropped["dropped_too_long"] == truncated["truncated"] + truncated["dropped_too_long"] and dropped["truncated"] == 0
    kept = lambda r: r["rows_train"] + r["rows_eval"]  # noqa: E731
    assert kept(dropped) == kept(truncated) - truncated["truncated"]


def test_missing_column_fails_before_any_model(project, monkeypatch):
    monkeypatch.setattr(data, "load_tokenizer", lambda recipe: pytest.fail("the tokenizer/model must not be loaded"))
    recipe, run_dir = project({"files": ["data/squad.jsonl"], "format": "squad", "columns": {"question": "question_text"}})
    with pytest.raises(StageError, match=r"'question_text' \(for question\) not found.*columns: id, context, question, answers"):
        data.run(recipe, run_dir)


def test_stage_names_a_file_that_is_not_utf8_and_prints_skipped_rows(project, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_tokenizer", lambda recipe: pytest.fail("the tokenizer/model must not be loaded"))
    (tmp_path / "data" / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(StageError, match=r"data/latin1.jsonl:2: not UTF-8 \(byte 0xe9"):
        data.run(*project({"files": ["data/latin1.jsonl"], "format": "text"}))
    (tmp_path / "data" / "bad.jsonl").write_text('{"text": ""}\nnot json\n{"text": 5}\n', "utf-8")
    with pytest.raises(StageError):
        data.run(*project({"files": ["data/bad.jsonl"], "format": "text"}))
    out = capsys.readouterr().out
    assert "[data] skipped data/bad.jsonl:2: not JSON (Expecting value at column 1)" in out
    assert "[data] skipped 3 rows: " in out and "invalid_record 1" in out


def test_zero_usable_rows_fail_before_any_model(project, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_tokenizer", lambda recipe: pytest.fail("the tokenizer/model must not be loaded"))
    (tmp_path / "data" / "bad.jsonl").write_text('{"text": ""}\nnot json\n{"text": 5}\n', "utf-8")
    with pytest.raises(StageError, match="no usable training rows in data/bad.jsonl.*empty_text"):
        data.run(*project({"files": ["data/bad.jsonl"], "format": "text"}))


def test_offline_hub_dataset_names_hf_endpoint_and_local_files(project, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    recipe, run_dir = project({"hub": "someone/persian-chat", "revision": "main", "format": "messages"})
    with pytest.raises(StageError, match="cannot be reached at http://127.0.0.1:9.*HF_ENDPOINT.*data.files"):
        data.run(recipe, run_dir)
