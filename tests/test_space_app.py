"""The Space app as it runs on a Space (`python space/app.py`, offline), driven by a real gradio_client.

Both backends answer a Persian prompt with a streamed reply: the GGUF (Q4_K_M of the tiny model, through
llama-cpp-python and the chat template inside the GGUF) and the merged checkpoint (transformers).
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "space"))
from space_testing import PERSIAN_PROMPT, client, free_port, running_app, stream_chat, tiny_gguf, wait_ready  # noqa: E402,F401

from hubforge.stages import space  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gguf_app(tiny_gguf, tmp_path_factory):
    log = tmp_path_factory.mktemp("gguf-app") / "app.log"
    with running_app({"GGUF_PATH": str(tiny_gguf), "RTL": "1", "N_CTX": "256"}, log) as url:
        yield url


def assert_streamed(outputs: list[str], final: str) -> None:
    assert final.strip(), "empty reply"
    assert len(outputs) >= 2, f"the reply came in one piece, not streamed: {outputs!r}"
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:])), "partial replies must grow"
    assert outputs[-1] == final


def test_gguf_backend_streams_a_persian_reply(gguf_app):
    status = client(gguf_app).predict(api_name="/status")
    assert (status["ready"], status["error"], status["backend"], status["n_ctx"]) == (True, None, "gguf", 256)
    outputs, final, _, _ = stream_chat(gguf_app, PERSIAN_PROMPT, max_new_tokens=24)
    assert_streamed(outputs, final)
    assert 1 <= client(gguf_app).predict(api_name="/status")["last_reply_tokens"] <= 24


def test_sampling_settings_reach_the_model(gguf_app):
    greedy = [stream_chat(gguf_app, PERSIAN_PROMPT, temperature=0.0, max_new_tokens=16)[1] for _ in range(2)]
    assert greedy[0] == greedy[1]  # temperature 0 is greedy: same prompt, same reply
    assert stream_chat(gguf_app, PERSIAN_PROMPT, system="همیشه کوتاه جواب بده", max_new_tokens=16)[1].strip()


def test_empty_message_is_refused_politely(gguf_app):
    outputs, final, _, _ = stream_chat(gguf_app, "   ")
    assert "empty message" in final and "Traceback" not in final


def test_over_long_input_is_cut_to_the_context_window_with_a_notice(gguf_app):
    _, final, _, _ = stream_chat(gguf_app, "سلام دوست من " * 400, max_new_tokens=16)
    assert final.startswith("> ⚠️ Your message was") and "to fit the context window" in final
    assert "Generation failed" not in final  # the cut prompt really fits the 256-token window


def test_transformers_backend_streams_a_persian_reply(tiny_base, tmp_path):
    with running_app({"BACKEND": "transformers", "MODEL_PATH": str(tiny_base)}, tmp_path / "app.log") as url:
        assert client(url).predict(api_name="/status")["backend"] == "transformers"
        outputs, final, _, _ = stream_chat(url, PERSIAN_PROMPT, max_new_tokens=24)
        assert 1 <= client(url).predict(api_name="/status")["last_reply_tokens"] <= 24
    assert_streamed(outputs, final)


def test_space_serve_runs_the_app_on_a_run_directory(make_recipe, tiny_gguf, tmp_path):
    """`hubforge space serve --run-dir DIR`: the run's own GGUF, the recipe's Space settings, no Hub. DIR is relative,
    as `make demo` prints it: the app runs in its own folder, so the CLI must resolve DIR where it was typed."""
    import shutil

    from hubforge.recipe import dump_resolved

    recipe = make_recipe(space={"examples": ["سلام"]})
    run = tmp_path / "run"
    (run / "gguf").mkdir(parents=True)
    (run / "recipe.resolved.yaml").write_text(dump_resolved(recipe))
    shutil.copy(tiny_gguf, run / "gguf" / f"{recipe.name}-Q4_K_M.gguf")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "hubforge.cli", "space", "serve", "--run-dir", "run",
                                "--port", str(port)], cwd=tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, None, 180)  # its output goes to pytest
        _, final, _, _ = stream_chat(f"http://127.0.0.1:{port}", PERSIAN_PROMPT, max_new_tokens=16)
        assert final.strip()
    finally:
        process.terminate()
        process.wait(15)
    with pytest.raises(ConnectionRefusedError):  # the app went down with the CLI instead of being orphaned
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
