"""Run-directory rules: resolved recipe + manifest, skip unchanged stages, redo changed ones, re-run crashed and
killed ones, never delete another stage's outputs, keep secrets out. Uses fake stages (tests/fixtures/fake_stages)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hubforge import pipeline
from hubforge.recipe import resolve
from hubforge.rundir import RunDir

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
RAW = {"name": "fake", "base": {"model": "embedded:gemma-3-270m"},
       "data": {"files": ["recipes/data/persian-chat.jsonl"], "format": "messages"}, "method": {"name": "lora"}}


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    import fake_stages

    monkeypatch.setattr(pipeline, "STAGES", fake_stages.STAGES)


def recipe(**train):
    return resolve({**RAW, "train": train}, root=REPO, source="fake.yaml")


def calls(run_dir: Path) -> list[str]:
    log = run_dir / "calls.log"
    return log.read_text().split() if log.exists() else []


def test_first_run_writes_resolved_recipe_manifest_and_outputs(tmp_path):
    r = recipe(seed=1)
    pipeline.run(r, RunDir.open(tmp_path), echo=lambda m: None)
    resolved = (tmp_path / "recipe.resolved.yaml").read_text("utf-8")
    assert f"# sha256: {r.sha256}" in resolved and "max_grad_norm: 1.0" in resolved
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recipe"]["sha256"] == r.sha256
    assert {"torch", "transformers", "python"} <= set(manifest["libraries"])
    assert manifest["host"]["cpus"] >= 1 and "git_commit" in manifest
    second = manifest["stages"]["second"]
    assert second["status"] == "done" and second["result"] == {"chars": 6}
    assert second["outputs"][0]["path"] == "second/out.txt" and len(second["outputs"][0]["sha256"]) == 64
    assert second["started_at"] <= second["ended_at"]
    assert calls(tmp_path) == ["first", "second", "third"]


def test_rerun_skips_unchanged_and_redoes_only_what_changed(tmp_path):
    rd = RunDir.open(tmp_path)
    pipeline.run(recipe(seed=1), rd, echo=lambda m: None)
    pipeline.run(recipe(seed=1), RunDir.open(tmp_path), echo=lambda m: None)
    assert calls(tmp_path) == ["first", "second", "third"]           # nothing re-ran
    pipeline.run(recipe(seed=2), RunDir.open(tmp_path), echo=lambda m: None)
    # first reads train.seed -> re-runs; its output changed -> second and third re-run too
    assert calls(tmp_path)[3:] == ["first", "second", "third"]
    assert (tmp_path / "third/out.txt").read_text() == "SEED=2!"
    # the earlier resolved recipe is kept, not overwritten
    assert len(list(tmp_path.glob("recipe.resolved.*.yaml"))) == 1


def test_a_stage_whose_output_vanished_is_redone(tmp_path):
    pipeline.run(recipe(), RunDir.open(tmp_path), echo=lambda m: None)
    (tmp_path / "second/out.txt").unlink()
    pipeline.run(recipe(), RunDir.open(tmp_path), echo=lambda m: None)
    assert calls(tmp_path)[3:] == ["second"]  # third's input (second's output hash) is identical again -> skipped


def test_failed_stage_is_recorded_without_secrets_and_rerun(tmp_path):
    (tmp_path / "FAIL").write_text("1")
    with pytest.raises(RuntimeError):
        pipeline.run(recipe(), RunDir.open(tmp_path), echo=lambda m: None)
    entry = RunDir.open(tmp_path).stage("third")
    assert entry["status"] == "failed" and "on purpose" in entry["error"]
    assert "hf_abcdefghijklmnop" not in (tmp_path / "manifest.json").read_text()
    (tmp_path / "FAIL").unlink()
    pipeline.run(recipe(), RunDir.open(tmp_path), echo=lambda m: None)
    assert calls(tmp_path) == ["first", "second", "third", "third"]
    assert (tmp_path / "first/out.txt").exists() and (tmp_path / "second/out.txt").exists()


def test_not_applicable_is_recorded(tmp_path):
    r = resolve({**RAW, "method": {"name": "prompt_tuning"}}, root=REPO)
    out = pipeline.run(r, RunDir.open(tmp_path), echo=lambda m: None)
    assert out["third"]["status"] == "not_applicable" and out["third"]["result"]["reason"] == "nothing to do"


def test_selected_stage_needs_its_inputs(tmp_path):
    with pytest.raises(pipeline.StageError, match="needs 'first'"):
        pipeline.run(recipe(), RunDir.open(tmp_path), ["second"], echo=lambda m: None)
    with pytest.raises(pipeline.StageError, match="unknown stage 'nope'"):
        pipeline.run(recipe(), RunDir.open(tmp_path), ["nope"], echo=lambda m: None)


def test_kill_9_leaves_an_interrupted_manifest_and_the_rerun_finishes(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests/fixtures')!r})
        import fake_stages
        from hubforge import pipeline
        from hubforge.recipe import resolve
        from hubforge.rundir import RunDir
        pipeline.STAGES = fake_stages.STAGES
        raw = {RAW!r}
        pipeline.run(resolve(raw, root=__import__('pathlib').Path({str(REPO)!r})), RunDir.open(sys.argv[1]))
    """))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "SLEEP").write_text("1")
    proc = subprocess.Popen([sys.executable, str(driver), str(run_dir)], stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (run_dir / "SLEEPING").exists():
        assert time.time() < deadline and proc.poll() is None, "driver never reached the second stage"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rd = RunDir.open(run_dir)
    assert rd.stage("first")["status"] == "done"
    assert rd.stage("second")["status"] == "interrupted"
    status = subprocess.run([sys.executable, "-m", "hubforge.cli", "status", str(run_dir)], capture_output=True, text=True)
    assert "interrupted" in status.stdout
    (run_dir / "SLEEP").unlink()
    subprocess.run([sys.executable, str(driver), str(run_dir)], check=True, stdout=subprocess.DEVNULL)
    assert calls(run_dir) == ["first", "second", "second", "third"]
    assert RunDir.open(run_dir).stage("third")["status"] == "done"


def test_two_runs_cannot_share_a_directory(tmp_path):
    rd = RunDir.open(tmp_path)
    held = rd.lock()
    try:
        with pytest.raises(RuntimeError, match="in use by another hubforge run"):
            pipeline.run(recipe(), RunDir.open(tmp_path), echo=lambda m: None)
    finally:
        held.close()


def test_version_drift_fails_loudly(monkeypatch, tmp_path):
    from importlib import metadata

    from hubforge import versions

    real = metadata.version
    monkeypatch.setattr(versions.metadata, "version", lambda name: "9.9.9" if name == "transformers" else real(name))
    with pytest.raises(RuntimeError, match="transformers 9.9.9 is installed; hubforge pins 5.23.0"):
        pipeline.run(recipe(), RunDir.open(tmp_path), echo=lambda m: None)
    assert not (tmp_path / "manifest.json").exists()  # nothing written half-way
    monkeypatch.setenv("HUBFORGE_ALLOW_VERSION_DRIFT", "1")
    with pytest.warns(UserWarning, match="differ from hubforge's pins"):
        pipeline.run(recipe(), RunDir.open(tmp_path), echo=lambda m: None)
