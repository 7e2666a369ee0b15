"""`hubforge summary RUN_DIR --compare-hub`: the release note of a GPU job compares each card of the run with the
README that the Hub serves now — a diff for a changed card, 'unchanged', or a first publish — through the real
client against the local Hub."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.hub

OLD = "---\nlicense: gemma\n---\n# tiny\n\n| metric | tuned |\n|---|---|\n| Perplexity | 31.2 |\n"
NEW = OLD.replace("31.2", "29.8")


def test_release_note_diffs_the_published_card_and_names_first_publishes(hub, api, tmp_path):
    from hubforge.cli import app

    user = api.whoami()["name"]
    repos = {"adapter": f"{user}/rn-lora", "merged": f"{user}/rn-merged", "gguf": f"{user}/rn-GGUF"}
    for kind in ("adapter", "merged"):
        api.create_repo(repos[kind], exist_ok=True)
        api.upload_file(path_or_fileobj=OLD.encode(), path_in_repo="README.md", repo_id=repos[kind])
    run = tmp_path / "run"
    (run / "card").mkdir(parents=True)
    for kind, text in (("adapter", NEW), ("merged", OLD), ("gguf", NEW)):
        (run / "card" / f"{kind}.md").write_text(text, "utf-8")
    (run / "manifest.json").write_text(json.dumps({"stages": {"card": {"status": "done", "result": {
        "cards": {k: f"card/{k}.md" for k in repos}, "repos": repos}}}}), "utf-8")

    result = CliRunner().invoke(app, ["summary", str(run), "--compare-hub"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"<code>{repos['adapter']}</code>: card changes" in out
    assert "-| Perplexity | 31.2 |" in out and "+| Perplexity | 29.8 |" in out  # the number users will see change
    assert f"`{repos['merged']}`: card unchanged" in out
    assert f"`{repos['gguf']}`: no card readable on the Hub (a first publish" in out
