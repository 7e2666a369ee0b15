"""The Space app's pure parts and the space stage's translators: no model, no server, no Hub."""
from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest

from hubforge.pipeline import StageError
from hubforge.space_runner import app_env, app_file
from hubforge import spaceserve
from hubforge.stages import space

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("space_app", REPO / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["space_app"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


class WordBackend:
    """A stand-in backend: one token per word, a reply of the given pieces."""

    n_ctx = 64

    def __init__(self, pieces=("سلام", " دنیا"), fail_after=None):
        self.pieces, self.fail_after = pieces, fail_after

    def tokens(self, text):
        return text.split()

    def detokenize(self, ids):
        return " ".join(ids)

    def stream(self, messages, temperature, top_p, max_new_tokens):
        for i, piece in enumerate(self.pieces):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("kv cache full at /secret/path")
            yield piece


def loaded(app, backend):
    model = app.Model(app.Settings(), "unused")
    model.backend = backend
    return model


# --- the app -------------------------------------------------------------------------------------------------------

def test_settings_from_env(app):
    s = app.Settings.from_env({"RTL": "1", "EXAMPLES": json.dumps(["سلام", " "]), "GGUF_REPO": "ns/m-GGUF",
                               "GGUF_FILE": "m-Q4_K_M.gguf", "HF_ENDPOINT": "http://127.0.0.1:9/"})
    assert s.rtl and s.backend == "gguf" and s.examples == ("سلام",)
    assert s.links == {"GGUF": "http://127.0.0.1:9/ns/m-GGUF"}
    assert not app.Settings.from_env({}).rtl
    with pytest.raises(SystemExit, match="EXAMPLES"):
        app.Settings.from_env({"EXAMPLES": '{"a": 1}'})
    with pytest.raises(SystemExit, match="BACKEND"):
        app.Settings.from_env({"BACKEND": "onnx"})


def test_fit_to_context_drops_oldest_exchanges_then_cuts_the_message(app):
    words = lambda n, w="w": " ".join([w] * n)  # noqa: E731
    history = [{"role": "user", "content": words(10, "old")}, {"role": "assistant", "content": words(10, "old")},
               {"role": "user", "content": words(10, "new")}, {"role": "assistant", "content": words(10, "new")}]
    messages = app.conversation("sys", history, words(5))
    budget = app.TEMPLATE_TOKENS_FIXED + 6 * app.TEMPLATE_TOKENS_PER_MESSAGE + 1 + 20 + 5 + 3
    fitted, notices = app.fit_to_context(messages, str.split, " ".join, budget)
    assert [m["content"].split()[0] for m in fitted] == ["sys", "new", "new", "w"]  # the older exchange went first
    assert len(notices) == 1 and "1 earlier exchange" in notices[0]

    fitted, notices = app.fit_to_context(app.conversation("", [], words(500)), str.split, " ".join, 100)
    kept = 100 - app.TEMPLATE_TOKENS_FIXED - app.TEMPLATE_TOKENS_PER_MESSAGE
    assert len(fitted[0]["content"].split()) == kept and "500 tokens" in notices[0] and f"first {kept}" in notices[0]

    untouched, notices = app.fit_to_context(messages, str.split, " ".join, 10_000)
    assert untouched == messages and notices == []


def test_conversation_strips_the_apps_notices_from_history(app):
    history = [{"role": "user", "content": "q"},
               {"role": "assistant", "content": f"{app.NOTICE}Your message was cut.\n\nthe answer"}]
    turns = app.conversation("", history, "next")
    assert turns == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the answer"},
                     {"role": "user", "content": "next"}]


def test_respond_refuses_empty_reports_loading_and_streams(app):
    model = app.Model(app.Settings(), "unused")
    assert "empty message" in list(app.respond(model, "  ", [], "", 0.7, 0.9, 16))[-1]
    assert "still loading" in list(app.respond(model, "سلام", [], "", 0.7, 0.9, 16))[-1]
    model.error = "OSError: bad file"
    assert "failed to load (OSError: bad file)" in list(app.respond(model, "سلام", [], "", 0.7, 0.9, 16))[-1]

    replies = list(app.respond(loaded(app, WordBackend()), "سلام", [], "", 0.7, 0.9, 16))
    assert replies == ["سلام", "سلام دنیا"]  # cumulative, as ChatInterface streams it


def test_generation_failure_is_a_message_not_a_traceback(app, capsys):
    replies = list(app.respond(loaded(app, WordBackend(fail_after=1)), "سلام", [], "", 0.7, 0.9, 16))
    assert replies[0] == "سلام" and "Generation failed (RuntimeError)" in replies[-1]
    assert "Traceback" not in replies[-1] and "/secret/path" not in replies[-1]
    assert "Traceback" in capsys.readouterr().err  # the details go to the Space log


def test_long_message_is_truncated_with_a_notice(app):
    reply = list(app.respond(loaded(app, WordBackend()), "x " * 500, [], "", 0.7, 0.9, 16))[-1]
    assert reply.startswith(app.NOTICE) and "500 tokens" in reply and reply.endswith("سلام دنیا")


def test_generations_never_overlap_and_an_abandoned_one_stops(app):
    active, peak, produced = [0], [0], []

    class Slow(WordBackend):
        def stream(self, messages, temperature, top_p, max_new_tokens):
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            try:
                for i in range(50):
                    time.sleep(0.01)
                    produced.append(i)
                    yield "x"
            finally:
                active[0] -= 1

    model = loaded(app, Slow())
    abandoned = model.stream([], 0.7, 0.9, 16)
    next(abandoned)
    abandoned.close()  # a browser that left: the generation must end early, releasing the model
    results = []
    threads = [threading.Thread(target=lambda: results.append("".join(model.stream([], 0.7, 0.9, 16)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["x" * 50] * 2 and peak[0] == 1
    assert len(produced) < 150  # the abandoned generation did not run to its end


def test_header_links(app):
    s = app.Settings.from_env({"TITLE": "دمو", "MODEL_REPO": "ns/m", "ADAPTER_REPO": "ns/m-lora"})
    assert app.header(s) == "# دمو\n[Model](https://huggingface.co/ns/m) · [Adapter](https://huggingface.co/ns/m-lora)\n"


# --- the stage -----------------------------------------------------------------------------------------------------

PUBLISHED = {"repos": {
    "adapter": {"repo_id": "hubforge/tiny-test-lora", "files": ["adapter_model.safetensors"]},
    "merged": {"repo_id": "hubforge/tiny-test", "files": ["model.safetensors"]},
    "gguf": {"repo_id": "hubforge/tiny-test-GGUF", "files": ["tiny-test-Q4_K_M.gguf", "tiny-test-Q8_0.gguf"]},
}}


def test_space_variables_from_recipe_and_publish_result(make_recipe):
    recipe = make_recipe(space={"examples": ["سلام"], "system_prompt": "فارسی جواب بده"})
    values = space.space_variables(recipe, PUBLISHED)
    assert values == {
        "MODEL_REPO": "hubforge/tiny-test", "GGUF_REPO": "hubforge/tiny-test-GGUF", "GGUF_FILE": "tiny-test-Q4_K_M.gguf",
        "ADAPTER_REPO": "hubforge/tiny-test-lora", "BACKEND": "gguf", "SYSTEM_PROMPT": "فارسی جواب بده",
        "EXAMPLES": '["سلام"]', "TITLE": "tiny-test", "RTL": "1",  # card.languages [fa] -> right-to-left
    }
    assert set(values) == set(space.VARIABLES)


def test_space_variables_refuse_what_was_not_published(make_recipe):
    with pytest.raises(StageError, match="space.backend is 'gguf' but no gguf repo"):
        space.space_variables(make_recipe(), {"repos": {"merged": PUBLISHED["repos"]["merged"]}})
    with pytest.raises(StageError, match="space.gguf_file 'Q6_K'"):
        space.space_variables(make_recipe(space={"gguf_file": "Q6_K"}), PUBLISHED)
    values = space.space_variables(make_recipe(space={"backend": "transformers"}), {"repos": {"merged": PUBLISHED["repos"]["merged"]}})
    assert values["BACKEND"] == "transformers" and values["GGUF_REPO"] == "" and values["MODEL_REPO"] == "hubforge/tiny-test"


def test_requirements_are_pinned_to_the_tested_versions_and_split_by_backend():
    text = (REPO / "space" / "requirements.txt").read_text()
    gguf, transformers = space.requirements_for("gguf", text), space.requirements_for("transformers", text)
    assert "llama-cpp-python==" in gguf and "transformers==" not in gguf and "torch==" not in gguf
    assert "transformers==" in transformers and "llama-cpp-python" not in transformers
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            assert metadata.version(name).split("+")[0] == version, f"space/requirements.txt pins {name}=={version}"


def test_run_dir_env_serves_the_runs_own_files(tmp_path, make_recipe, monkeypatch):
    from hubforge.recipe import dump_resolved

    recipe = make_recipe(space={"examples": ["سلام"]})
    (tmp_path / "recipe.resolved.yaml").write_text(dump_resolved(recipe))
    with pytest.raises(StageError, match="run the gguf stage, or serve with --backend transformers"):
        spaceserve.run_dir_env(tmp_path)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "tiny-test-Q4_K_M.gguf").write_bytes(b"GGUF")
    env = spaceserve.run_dir_env(tmp_path)
    assert env["GGUF_PATH"] == str(tmp_path / "gguf" / "tiny-test-Q4_K_M.gguf") and env["RTL"] == "1"
    assert json.loads(env["EXAMPLES"]) == ["سلام"]
    monkeypatch.chdir(tmp_path.parent)  # a relative run directory becomes absolute: the app runs in another folder
    assert spaceserve.run_dir_env(Path(tmp_path.name))["GGUF_PATH"] == env["GGUF_PATH"]
    with pytest.raises(StageError, match="hub_env|--model-repo"):
        spaceserve.hub_env(backend="transformers")


# --- the local Hub's Space runner ----------------------------------------------------------------------------------

def test_runner_environment_is_the_spaces_not_the_deployers():
    env = app_env({"PATH": "/bin", "HF_TOKEN": "hf_deployer", "HF_HUB_OFFLINE": "1"}, {"BACKEND": "gguf"},
                  {"HF_TOKEN": "hf_space_secret"}, endpoint="http://127.0.0.1:5", port=7000, repo_id="ns/demo")
    assert env["HF_TOKEN"] == "hf_space_secret" and "HF_HUB_OFFLINE" not in env and env["PATH"] == "/bin"
    assert (env["HF_ENDPOINT"], env["GRADIO_SERVER_PORT"], env["BACKEND"]) == ("http://127.0.0.1:5", "7000", "gguf")
    assert "HF_TOKEN" not in app_env({"HF_TOKEN": "hf_deployer"}, {}, {}, endpoint="e", port=1, repo_id="a/b")


def test_runner_reads_app_file_from_front_matter(tmp_path):
    assert app_file(tmp_path) == "app.py"
    (tmp_path / "README.md").write_text("---\nsdk: gradio\napp_file: src/main.py\n---\n# x\n")
    assert app_file(tmp_path) == "src/main.py"


def test_space_serve_cli_names_what_is_missing(tmp_path):
    from typer.testing import CliRunner

    from hubforge.cli import app

    runner = CliRunner()
    nothing = runner.invoke(app, ["space", "serve"])
    assert nothing.exit_code == 1 and "--run-dir" in nothing.output
    no_recipe = runner.invoke(app, ["space", "serve", "--run-dir", str(tmp_path)])
    assert no_recipe.exit_code == 1 and "recipe.resolved.yaml" in no_recipe.output
    gguf_without_file = runner.invoke(app, ["space", "serve", "--gguf-repo", "me/x-GGUF"])
    assert gguf_without_file.exit_code == 1 and "--gguf-file" in gguf_without_file.output
    bad_backend = runner.invoke(app, ["space", "serve", "--run-dir", str(tmp_path), "--backend", "onnx"])
    assert bad_backend.exit_code == 1 and "gguf or transformers" in bad_backend.output
