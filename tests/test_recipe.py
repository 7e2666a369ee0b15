"""Recipe schema, validation errors, overrides and hashing (fast; no models)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hubforge import recipe as R
from hubforge.recipe import RecipeError, find_recipes, load_recipe, resolve

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests/fixtures/recipes/bad"
ALL_RECIPES = find_recipes([REPO / "recipes"])


def test_every_recipe_is_found_recursively_and_there_are_enough():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in ALL_RECIPES}
    assert "gemma-3-270m/persian-chat-lora.yaml" in names
    assert len(names) >= 9 and any("/" in n for n in names)


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shipped_recipe_validates_and_names_its_command(path):
    recipe = load_recipe(path)
    first = path.read_text("utf-8").splitlines()[0]
    assert first.startswith("# Run: hubforge run ") and str(path.relative_to(REPO)) in first
    assert recipe.source == str(path)


# (fixture, substrings that must all appear in the error)
BAD_CASES = {
    "malformed.yaml": ["malformed.yaml:4:", "malformed YAML"],
    "wrong-types.yaml": ["method.lora.r", "'eight' is not of type 'integer'", "train.packing", "train.batch_size"],
    "unknown-key.yaml": ["train.learning_rat", "did you mean 'learning_rate'"],
    "missing-required.yaml": ["missing required field 'method'", "base: missing required field 'model'"],
    "enum.yaml": ["data.format", "'sharegpt' is not one of", "method.name", "'dora'"],
    "nonpositive.yaml": ["train.learning_rate", "-0.0001", "train.batch_size", "less than the minimum of 1"],
    "foreign-method-params.yaml": ["method.p_tuning", "do not belong to method 'lora'"],
    "gguf-type.yaml": ["export.gguf.quants[1]", "'Q7_X' is not one of"],
    "gguf-split.yaml": ["gguf-split.yaml:5:", "export.gguf.split_above", "'2GB' does not match"],
    "repo-id.yaml": ["publish.merged_repo", "bad repo!!"],
    "path-escape.yaml": ["data.files[0]", "outside the repository"],
    "empty.yaml": ["empty"],
    "list.yaml": ["the recipe is a list", "mapping"],
    "scalar.yaml": ["the recipe is a str", "mapping"],
    "not-utf8.yaml": ["not-utf8.yaml:1:", "not UTF-8", "0xe9"],
    "trust-remote-code.yaml": ["base.trust_remote_code", "refused"],
    "duplicate-key.yaml": ["duplicate key 'base'", ":3:"],
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_recipe_gets_a_clear_error(name):
    with pytest.raises(RecipeError) as info:
        load_recipe(BAD / name, root=REPO)
    message = str(info.value)
    for expected in BAD_CASES[name]:
        assert expected in message, f"{expected!r} missing from:\n{message}"


def test_bad_fixture_table_covers_every_fixture():
    assert set(BAD_CASES) | {"many-errors.yaml"} == {p.name for p in BAD.iterdir()}


def test_all_schema_errors_are_reported_at_once_with_paths_and_lines():
    with pytest.raises(RecipeError) as info:
        load_recipe(BAD / "many-errors.yaml", root=REPO)
    problems = info.value.problems
    assert any("'Many_Errors' is not allowed: use 2-64 lowercase" in p for p in problems)
    paths = ["name", "data.eval_fraction", "method.lora.r", "method.lora.target_modules", "train.epochs", "train.optimizer"]
    for path in paths:
        assert any(f": {path}:" in p for p in problems), (path, problems)
    assert len(problems) >= len(paths)
    assert all(p.startswith(f"{BAD / 'many-errors.yaml'}:") and p.split(":")[1].isdigit() for p in problems)


def test_cli_validate_reports_each_file_and_exits_1(tmp_path):
    from typer.testing import CliRunner

    from hubforge.cli import app

    good = CliRunner().invoke(app, ["validate", str(REPO / "recipes")])
    assert good.exit_code == 0, good.output
    assert good.output.count("ok    ") == len(ALL_RECIPES)
    bad = CliRunner().invoke(app, ["validate", str(BAD / "unknown-key.yaml"), str(REPO / "recipes/gemma-3-270m")])
    assert bad.exit_code == 1
    assert "FAIL" in bad.output and "did you mean 'learning_rate'" in bad.output


def test_precedence_defaults_then_yaml_then_set():
    path = REPO / "recipes/gemma-3-270m/persian-chat-lora.yaml"
    plain = load_recipe(path)
    assert plain.train.learning_rate == 2e-4          # YAML beats default (0.0002 is also the default...)
    assert plain.train.max_grad_norm == 1.0           # default filled in
    assert plain.train.scheduler == "cosine"          # YAML beats default 'linear'
    over = load_recipe(path, ["train.scheduler=constant", "train.max_steps=7", "method.lora.r=4"])
    assert (over.train.scheduler, over.train.max_steps, over.method.lora.r) == ("constant", 7, 4)
    with pytest.raises(RecipeError, match="train.batch_size"):
        load_recipe(path, ["train.batch_size=0"])      # overrides are validated like YAML
    with pytest.raises(RecipeError, match="did you mean 'max_steps'"):
        load_recipe(path, ["train.max_step=3"])


def test_yaml_floats_in_exponent_form_are_numbers(tmp_path):
    text = (REPO / "tests/fixtures/recipes/good/minimal.yaml").read_text("utf-8") + "train: {learning_rate: 2e-5}\n"
    (tmp_path / "r.yaml").write_text(text, "utf-8")
    (tmp_path / "recipes/data").mkdir(parents=True)
    (tmp_path / "recipes/data/persian-chat.jsonl").write_text("{}\n")
    assert load_recipe(tmp_path / "r.yaml", root=tmp_path).train.learning_rate == 2e-5


def test_resolved_recipe_is_complete_and_hash_is_stable():
    path = REPO / "recipes/gemma-3-270m/persian-chat-lora.yaml"
    a, b = load_recipe(path), load_recipe(path)
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    assert load_recipe(path, ["train.seed=1"]).sha256 != a.sha256
    dumped = yaml.safe_load(R.dump_resolved(a))
    assert dumped == json.loads(json.dumps(a.to_dict()))
    # Re-resolving the resolved recipe is a fixed point: every default is explicit in the file.
    again = resolve(dumped, root=REPO)
    assert again.sha256 == a.sha256
    assert a.publish.merged_repo == "hubforge/gemma-3-270m-persian-chat"
    assert a.space.rtl is True and a.eval.prompts == a.space.examples


def test_method_subsections_are_filled_only_for_the_chosen_method():
    base = {"name": "mm", "base": {"model": "embedded:gemma-3-270m"},
            "data": {"files": ["recipes/data/persian-chat.jsonl"], "format": "messages"}}
    pt = resolve({**base, "method": {"name": "prompt_tuning"}}, root=REPO)
    assert pt.method.prompt_tuning.num_virtual_tokens == 20 and pt.method.lora is None
    assert pt.publish.adapter_repo.endswith("-prompt-tuning")
    q = resolve({**base, "method": {"name": "qlora"}}, root=REPO)
    assert q.method.quantization.quant_type == "nf4" and q.method.lora.r == 8


def test_known_gguf_types_exist_in_llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp")
    enum = R.schema()["properties"]["export"]["properties"]["gguf"]["properties"]["quants"]["items"]["enum"]
    for t in enum:
        assert hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}"), t


def test_qa_metrics_need_squad_data():
    raw = {"name": "qa", "base": {"model": "embedded:gemma-3-270m"},
           "data": {"files": ["recipes/data/persian-chat.jsonl"], "format": "messages"},
           "method": {"name": "lora"}, "eval": {"qa": True}}
    with pytest.raises(RecipeError, match="eval.qa"):
        resolve(raw, root=REPO)


# ---------------------------------------------------------------- local paths: one rule for every path field
def test_the_schema_marks_every_path_field():
    assert dict(R.path_fields()) == {("base", "model"): "local-folder", ("data", "files", "*"): "file",
                                     ("eval", "lm_eval", "include_path"): "folder",
                                     ("export", "gguf", "imatrix", "file"): "file"}


@pytest.fixture
def repo_tree(tmp_path):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "ok.jsonl").write_text('{"text": "x"}\n', "utf-8")
    (root / "tasks").mkdir()
    (root / "data" / "passwd.jsonl").symlink_to("/etc/passwd")
    (root / "outside-tasks").symlink_to(tmp_path, target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    return root


def path_errors(root: Path, data: dict | None = None, base: str = "embedded:gemma-3-270m", include_path=None) -> str:
    raw = {"name": "paths", "base": {"model": base}, "data": {"format": "text", "files": ["data/ok.jsonl"], **(data or {})},
           "method": {"name": "lora"}, "eval": {"lm_eval": {"include_path": include_path}}}
    try:
        resolve(raw, root=root, source="<t>")
    except RecipeError as exc:
        return "\n".join(exc.problems)
    return ""


@pytest.mark.parametrize("field, value, expected", [
    ("include_path", "/etc", "eval.lm_eval.include_path: '/etc' is outside the repository"),
    ("include_path", "../", "eval.lm_eval.include_path: '../' is outside the repository"),
    ("include_path", "outside-tasks", "(a symlink leads to "),
    ("include_path", "data/ok.jsonl", "is not a folder"),
    ("include_path", "nope", "'nope' does not exist under"),
    ("files", "data/passwd.jsonl", "data.files[0]: 'data/passwd.jsonl' is outside the repository"),
    ("files", "/etc/passwd", "data.files[0]: '/etc/passwd' is outside the repository"),
    ("files", "loop", "data.files[0]: 'loop' "),
    ("files", "data/" + "x" * 300 + ".jsonl", "has a name of 306 bytes"),
    ("files", "data/ok\0.jsonl", "contains a NUL byte"),
    ("files", "d/" * 2100, "is longer than 4096 bytes"),
    ("base", "/etc", "base.model: '/etc' is outside the repository"),
    ("base", "./models/../../x", "base.model: './models/../../x' is outside the repository"),
])
def test_every_path_field_is_confined_by_one_rule(repo_tree, field, value, expected):
    args = {"files": {"data": {"files": [value]}}, "base": {"base": value}, "include_path": {"include_path": value}}[field]
    assert expected in path_errors(repo_tree, **args)


def test_paths_inside_the_repository_pass_and_a_local_base_may_be_fetched_later(repo_tree):
    assert path_errors(repo_tree, include_path="tasks", base="./models/not-fetched-yet") == ""
    assert path_errors(repo_tree, data={"files": [str(repo_tree / "data" / "ok.jsonl")]}) == ""  # absolute, inside


def test_validate_names_an_overlong_or_nul_path_instead_of_crashing(tmp_path):
    from typer.testing import CliRunner

    from hubforge.cli import app

    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "long.yaml").write_text("name: long\nbase: {model: 'embedded:gemma-3-270m'}\nmethod: {name: lora}\n"
                                        f"data: {{format: text, files: [data/{'a' * 300}.jsonl]}}\n", "utf-8")
    (tmp_path / "nul.yaml").write_text('name: nul\nbase: {model: "./m\\0x"}\nmethod: {name: lora}\n'
                                       "data: {format: text, files: [x.jsonl]}\n", "utf-8")
    result = CliRunner().invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 1 and not isinstance(result.exception, OSError), result.output
    assert "long.yaml:4:" in result.output and "has a name of 306 bytes" in result.output
    assert "nul.yaml:2:" in result.output and "base.model: './m\\x00x' contains a NUL byte" in result.output


def test_a_lone_surrogate_escape_is_a_validation_error_not_a_crash(tmp_path):
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "d.jsonl").write_text("{}\n")
    path = tmp_path / "s.yaml"
    path.write_text('name: sur\nbase: {model: "./m\\uDCFF"}\nmethod: {name: lora}\n'
                    'data: {format: text, files: [d.jsonl]}\ncard: {"k\\uD800": 1, tags: [ok, "\\uDFFF"]}\n', "utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert [p.split(": ", 2)[1] for p in info.value.problems] == ["base.model", "card.(a key)", "card.tags[1]"]
    assert all("lone surrogate" in p for p in info.value.problems)
    raw = {"name": "x1", "base": {"model": "embedded:gemma-3-270m"}, "method": {"name": "lora"},
           "data": {"format": "text", "files": ["d.jsonl"]}}
    with pytest.raises(RecipeError, match=r"card.description: holds a lone surrogate"):  # from --set too
        resolve(raw, root=tmp_path, overrides=['card.description="\\udcff"'])
