"""A non-editable install (`pip install .` into a folder of its own) validates, plans, renders cards and deploys the
Space: the card templates + schema and the Space app travel inside the package, not beside a source checkout.

Every command runs as a subprocess with the installed copy first on PYTHONPATH and its working directory outside
the repository, and checks that the hubforge it imported is the installed one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "space"))
from space_testing import published_gguf_run, tiny_gguf  # noqa: E402,F401

pytestmark = [pytest.mark.integration, pytest.mark.hub]
REPO = Path(__file__).resolve().parents[1]
GOLDENS = REPO / "tests" / "fixtures" / "cards"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("src", "cards", "space"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(work / "site"), str(source)], check=True, capture_output=True, timeout=600)
    return work / "site"


def installed(site: Path, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_copy_is_the_one_imported_and_ships_its_files(site, tmp_path):
    out = installed(site, ["-c", "import hubforge, hubforge.shipped as s; print(hubforge.__file__); "
                                 "print(s.folder('cards')); print(s.folder('space'))"], tmp_path)
    module, cards, space = out.stdout.split()
    assert Path(module).is_relative_to(site) and Path(cards) == site / "hubforge" / "cards", out.stderr
    assert (Path(cards) / "schema" / "card-metadata.schema.json").is_file() and (Path(space) / "app.py").is_file()
    assert sorted(p.name for p in (Path(cards) / "templates").iterdir()) == sorted(p.name for p in (REPO / "cards" / "templates").iterdir())


def test_validate_and_plan_from_the_installed_copy(site, tmp_path):
    ok = installed(site, ["-m", "hubforge.cli", "validate", str(REPO / "recipes"), "--json"], tmp_path)
    assert ok.returncode == 0 and all(r["ok"] for r in json.loads(ok.stdout)), ok.stderr
    plan = installed(site, ["-m", "hubforge.cli", "plan", str(REPO / "recipes/gemma-3-270m/persian-chat-lora.yaml"),
                            "--format", "json"], tmp_path)
    assert plan.returncode == 0 and "gemma-3-270m-persian-chat-Q4_K_M.gguf" in json.loads(plan.stdout)["gguf_files"]


def test_cards_render_from_the_installed_copy_as_the_goldens(site, tmp_path):
    script = f"""
import shutil, sys
from pathlib import Path
import hubforge
from hubforge.recipe import load_recipe
from hubforge.rundir import RunDir
from hubforge.stages import card
fixtures = Path({str(GOLDENS)!r})
recipe = load_recipe(fixtures / "recipes" / "persian-chat-lora.yaml", root=fixtures)
shutil.copytree(fixtures / "runs" / "persian-chat-lora", "run")
result = card.run(recipe, RunDir.open(Path("run")))
for kind in ("adapter", "merged", "gguf"):
    assert Path("run", result["cards"][kind]).read_text("utf-8") == (fixtures / "goldens/persian-chat-lora" / f"{{kind}}.md").read_text("utf-8"), kind
print(hubforge.__file__)
"""
    out = installed(site, ["-c", script], tmp_path, {"HF_TOKEN": "hf_FixtureTokenThatMustNeverAppear123"})
    assert out.returncode == 0 and Path(out.stdout.strip()).is_relative_to(site), out.stderr


def test_space_deploy_from_the_installed_copy(site, tmp_path, make_recipe, tiny_gguf, monkeypatch):
    from huggingface_hub import HfApi, constants

    from hubforge.hub import serve
    from hubforge.recipe import dump_resolved
    from hubforge.space_runner import SpaceRunner

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the local Hub speaks LFS, not Xet
    hub = serve(tmp_path / "hub")
    runner = SpaceRunner.attach(hub, start_timeout=120)
    try:
        token = hub.token_path.read_text().strip()
        api = HfApi(endpoint=hub.endpoint, token=token)
        name = f"tiny-{uuid.uuid4().hex[:6]}"
        recipe = make_recipe(name=name, space={"examples": ["سلام"]})
        run_dir = published_gguf_run(api, recipe, tiny_gguf, tmp_path / "run")
        recipe_file = recipe.root / "recipe.yaml"  # no .git/pyproject above it: local paths resolve beside it
        recipe_file.write_text(yaml.safe_dump(yaml.safe_load(dump_resolved(recipe)), allow_unicode=True), "utf-8")
        env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home")}
        out = installed(site, ["-m", "hubforge.cli", "space", "deploy", str(recipe_file), "--run-dir", str(run_dir.path),
                               "--timeout", "120"], tmp_path, env)
        assert out.returncode == 0 and "RUNNING" in out.stdout, out.stdout + out.stderr
        uploaded = api.hf_hub_download(recipe.space.id, "app.py", repo_type="space", cache_dir=tmp_path / "dl")
        assert Path(uploaded).read_bytes() == (site / "hubforge" / "space" / "app.py").read_bytes()
    finally:
        runner.stop_all()
        hub.stop()
