"""The publish stage against a real local Hub through the unmodified huggingface_hub client (nothing mocked).

A run directory is built for real from the tiny Gemma 3 (with a wider MLP, so the merged safetensors and the F16
GGUF cross the Hub's 10 MB LFS threshold like real models do): a PEFT LoRA adapter, the merged model, a GGUF made
by llama.cpp's converter, minimal valid cards, and manifest entries. Then: publish, download, load each artifact
with the library that should read it, re-publish (no commit, no bytes), change a card (only the card moves), and
every refusal: gates, preflight (token, scope, namespace, Xet, names), private repos, an interrupted publish.

    .venv/bin/python -m pytest tests/test_publish.py -q -p no:cacheprovider
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import threading
import uuid
from pathlib import Path

import pytest
import yaml

if "huggingface_hub" not in sys.modules:  # read at import: keep the client on plain HTTP + LFS (the local Hub has no Xet)
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from hubforge.pipeline import StageError  # noqa: E402
from hubforge.recipe import resolve  # noqa: E402
from hubforge.rundir import RunDir  # noqa: E402
from hubforge import hubclient  # noqa: E402
from hubforge.stages import publish  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.hub]

LFS_THRESHOLD = 10 * 2**20
RUN_ID = "run-0001"
NAME = "tiny-pub"
RAW = {
    "name": NAME,
    "base": {"model": "./base"},
    "data": {"files": ["data/chat.jsonl"], "format": "messages"},
    "method": {"name": "lora"},
    "card": {"languages": ["fa"], "description": "publish test"},
}
CARDS = {
    "adapter": "---\nlicense: apache-2.0\nlibrary_name: peft\ntags:\n- hubforge\n- lora\nlanguage:\n- fa\n---\n# tiny-pub LoRA adapter\n",
    "merged": "---\nlicense: apache-2.0\nlibrary_name: transformers\ntags:\n- hubforge\nlanguage:\n- fa\n---\n# tiny-pub\n",
    "gguf": "---\nlicense: apache-2.0\ntags:\n- hubforge\n- gguf\nlanguage:\n- fa\n---\n# tiny-pub GGUF\n",
}


# ---------------------------------------------------------------- the local Hub and the client's environment
@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from hubforge.hub import serve

    server = serve(tmp_path_factory.mktemp("publish-hub"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token(hub) -> str:
    return hub.token_path.read_text().strip()  # the default user "hubforge", write scope


def point_client_at(mp, endpoint: str, token: str | None, home: Path) -> None:
    """The client's import-time constants are patched (tests only): another test module may have imported it first."""
    from huggingface_hub import constants

    mp.setenv("HF_ENDPOINT", endpoint)
    mp.setenv("HF_TOKEN", token) if token else mp.delenv("HF_TOKEN", raising=False)
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        mp.delenv(var, raising=False)
    mp.setattr(constants, "ENDPOINT", endpoint)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # no stored token unless a test writes one


@pytest.fixture(scope="module")
def env(hub, token, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        point_client_at(mp, hub.endpoint, token, tmp_path_factory.mktemp("hf-home"))
        yield hub


@pytest.fixture(scope="module")
def api(env, token):
    from huggingface_hub import HfApi

    return HfApi(endpoint=env.endpoint, token=token)


# ---------------------------------------------------------------- a real run directory
@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_base, persian_chat_file) -> Path:
    """Project root: data file + a wider copy of the tiny base (same tokenizer, intermediate_size 4096)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    shutil.copy(persian_chat_file, root / "data" / "chat.jsonl")
    base = root / "base"
    shutil.copytree(tiny_base, base, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = AutoConfig.from_pretrained(tiny_base)
    config.intermediate_size = 4096
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base, safe_serialization=True)
    return root


def make_recipe(project: Path, **sections):
    raw = copy.deepcopy(RAW)
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return resolve(raw, root=project, source="<test>")


def unique_publish(tag: str, **extra) -> dict:
    uid = uuid.uuid4().hex[:6]
    return {"adapter_repo": f"{tag}-{uid}-lora", "merged_repo": f"{tag}-{uid}", "gguf_repo": f"{tag}-{uid}-GGUF", **extra}


def mark(run_dir: RunDir, name: str, result: dict, status: str = "done") -> None:
    run_dir.mark(name, status=status, result=result, outputs=run_dir.describe_outputs(name))


def write_cards(run_dir: RunDir, kinds) -> None:
    for kind in kinds:
        folder = run_dir.stage_dir("card") / kind
        folder.mkdir(exist_ok=True)
        (folder / "README.md").write_text(CARDS[kind], "utf-8")
    mark(run_dir, "card", {"cards": {k: f"card/{k}/README.md" for k in kinds}, "validated": True})


@pytest.fixture(scope="module")
def run_dir(project, tmp_path_factory) -> RunDir:
    """train (LoRA) -> merge (merge_and_unload, bf16) -> gguf (llama.cpp converter, F16) -> cards, all recorded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubforge import llamacpp, ollama
    from hubforge.rundir import sha256_file

    rd = RunDir.open(tmp_path_factory.mktemp("runs") / RUN_ID)
    base = project / "base"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():  # as if trained: B is zero at init, which would make the adapter a no-op
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft.save_pretrained(rd.stage_dir("train") / "adapter")
    mark(rd, "train", {"method": "lora", "adapter_dir": "train/adapter", "steps": 2})

    merged_dir = rd.stage_dir("merge") / "model"
    peft.merge_and_unload().to(torch.bfloat16).save_pretrained(merged_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(merged_dir)
    shutil.copy(base / "tokenizer.model", merged_dir / "tokenizer.model")
    mark(rd, "merge", {"model_dir": "merge/model", "dtype": "bfloat16", "max_abs_logit_diff": 0.01, "threshold": 0.5,
                       "gated": True})

    gguf_dir = rd.stage_dir("gguf")
    f16 = gguf_dir / f"{NAME}-F16.gguf"
    work = tmp_path_factory.mktemp("gguf-work")
    llamacpp.convert_model(llamacpp.converter_input(merged_dir, work / "model"), f16, "F16")
    files = [{"file": f"gguf/{f16.name}", "type": "F16", "size": f16.stat().st_size, "sha256": sha256_file(f16)}]
    (gguf_dir / "quality.json").write_text(json.dumps({"model": NAME, "files": files}), "utf-8")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    runtime = ollama.write_files(gguf_dir, tokenizer, tokenizer.chat_template)  # as the gguf stage does
    runtime["files"] = [f"gguf/{name}" for name in runtime["files"]]
    mark(rd, "gguf", {"files": files, "quality": "gguf/quality.json", "tokenizer_probe": {"ok": True}, "lora_gguf": None,
                      "ollama": runtime})
    write_cards(rd, ("adapter", "merged", "gguf"))
    return rd


def clone(rd: RunDir, dest: Path) -> RunDir:
    shutil.copytree(rd.path, dest / RUN_ID)
    return RunDir.open(dest / RUN_ID)


@pytest.fixture(scope="module")
def published(env, api, project, run_dir):
    """Published the way `hubforge run RECIPE --publish --stages publish` does it: preflight, stage, manifest."""
    from hubforge import pipeline

    recipe = make_recipe(project)
    before = env.stats.snapshot()
    pipeline.run(recipe, run_dir, ["publish"], publish=True)
    assert run_dir.stage("publish")["status"] == "done"
    return recipe, run_dir.result("publish"), before, env.stats.snapshot()


def commits(api, repo_id: str) -> list:
    return api.list_repo_commits(repo_id)


# ---------------------------------------------------------------- publish, download, use
def test_publish_makes_one_tagged_commit_per_repo(api, published, run_dir, token):
    recipe, result, before, after = published
    expected = {
        "adapter": {"README.md", "adapter_config.json", "adapter_model.safetensors"},
        "merged": {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "tokenizer.model"},
        "gguf": {"README.md", f"{NAME}-F16.gguf", "quality.json", "template", "params"},  # Ollama's two files
    }
    assert set(result["repos"]) == set(expected)
    assert result["tag"] == f"recipe-{recipe.sha256[:12]}"
    for kind, info in result["repos"].items():
        repo_id = {"adapter": recipe.publish.adapter_repo, "merged": recipe.publish.merged_repo, "gguf": recipe.publish.gguf_repo}[kind]
        assert info["repo_id"] == repo_id and info["uploaded"] is True
        assert expected[kind] <= set(info["files"]) and set(info["files"]) <= expected[kind] | {"special_tokens_map.json", "chat_template.jinja"}
        assert set(api.list_repo_files(repo_id)) == set(info["files"]) | {".gitattributes"}
        history = commits(api, repo_id)
        assert len(history) == 2  # the repo's initial commit + exactly one publish commit
        assert history[0].commit_id == info["commit"] == api.repo_info(repo_id).sha
        assert recipe.name in history[0].title and recipe.sha256 in history[0].title and RUN_ID in history[0].title
        tags = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}
        assert tags[result["tag"]] == info["commit"]
        assert info["url"].endswith(repo_id)
    # the big files went through LFS: batch + presigned PUT, byte for byte
    tree = {e.path: e for e in api.list_repo_tree(recipe.publish.merged_repo)}
    big = tree["model.safetensors"]
    assert big.size > LFS_THRESHOLD and big.lfs is not None and big.lfs.size == big.size
    gguf_entry = {e.path: e for e in api.list_repo_tree(recipe.publish.gguf_repo)}[f"{NAME}-F16.gguf"]
    assert gguf_entry.size > LFS_THRESHOLD and gguf_entry.lfs is not None
    assert after["lfs_bytes_received"] - before.get("lfs_bytes_received", 0) >= big.size + gguf_entry.size
    assert after["commits_created"] - before.get("commits_created", 0) == 3
    assert token not in json.dumps(result) and token not in (run_dir.path / "manifest.json").read_text()


def test_published_repos_load_with_peft_transformers_and_llama_cpp(env, api, published, project, tmp_path):
    import torch
    from huggingface_hub import ModelCard, snapshot_download
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, result, _, _ = published
    local = {kind: Path(snapshot_download(info["repo_id"], endpoint=env.endpoint, cache_dir=tmp_path / "dl"))
             for kind, info in result["repos"].items()}
    tokenizer = AutoTokenizer.from_pretrained(local["merged"])
    ids = tokenizer("سلام! حالت چطور است؟", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(project / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, local["adapter"]).eval()
        peft_logits = adapted(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(local["merged"], dtype=torch.float32).eval()
        merged_logits = merged(ids).logits
    assert (peft_logits - base_logits).abs().max() > 0.05  # the adapter really changes the model...
    assert (peft_logits - merged_logits).abs().max() < 0.05  # ...and the merged repo is that same model (bf16 rounding)

    llm = Llama(model_path=str(local["gguf"] / f"{NAME}-F16.gguf"), n_ctx=64, verbose=False)
    assert llm.n_vocab() == merged.config.vocab_size
    out = llm.create_completion("Hello", max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1

    for kind, info in result["repos"].items():
        card = ModelCard.load(info["repo_id"])  # by repo id, through HF_ENDPOINT, like any user
        front, body = CARDS[kind].split("---\n")[1:3]
        assert card.data.to_dict() == yaml.safe_load(front) and card.text.strip() == body.strip()


def test_republish_of_unchanged_artifacts_makes_no_commit_and_sends_no_bytes(env, api, published, run_dir):
    recipe, first, _, _ = published
    from hubforge import pipeline

    before = env.stats.snapshot()
    pipeline.run(recipe, run_dir, ["publish"], publish=True, force=True)  # force: the pipeline skips an up-to-date stage
    again = run_dir.result("publish")
    after = env.stats.snapshot()
    for kind, info in again["repos"].items():
        assert info["uploaded"] is False and info["commit"] == first["repos"][kind]["commit"] == info["previous"]
        assert len(commits(api, info["repo_id"])) == 2
        assert again["tag"] in {t.name for t in api.list_repo_refs(info["repo_id"]).tags}
    for counter in ("commits_created", "lfs_bytes_received", "inline_bytes_received"):
        assert after.get(counter, 0) == before.get(counter, 0), counter


def test_a_changed_card_alone_uploads_only_the_card(env, api, published, run_dir, tmp_path):
    recipe, first, _, _ = published
    rd = clone(run_dir, tmp_path)
    card = rd.path / "card" / "gguf" / "README.md"
    card.write_text(CARDS["gguf"] + "\nQuantization table updated.\n", "utf-8")
    mark(rd, "card", rd.result("card"))  # the card stage re-ran: new outputs recorded
    old = first["repos"]["gguf"]["commit"]
    before = env.stats.snapshot()
    result = publish.run(recipe, rd)
    after = env.stats.snapshot()
    assert [k for k, v in result["repos"].items() if v["uploaded"]] == ["gguf"]
    new = result["repos"]["gguf"]["commit"]
    repo = result["repos"]["gguf"]["repo_id"]
    assert commits(api, repo)[0].commit_id == new and commits(api, repo)[1].commit_id == old
    tree = lambda rev: {e.path: e.blob_id for e in api.list_repo_tree(repo, revision=rev)}  # noqa: E731
    changed = {p for p in tree(new) if tree(new)[p] != tree(old).get(p)}
    assert changed == {"README.md"}
    assert after["lfs_bytes_received"] == before["lfs_bytes_received"]
    assert after["inline_bytes_received"] - before["inline_bytes_received"] == len(card.read_bytes())
    assert after["commits_created"] - before["commits_created"] == 1
    assert {t.name: t.target_commit for t in api.list_repo_refs(repo).tags}[result["tag"]] == new


def test_prompt_tuning_publishes_only_the_adapter(env, api, project, run_dir, tmp_path):
    import torch
    from huggingface_hub import snapshot_download
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rd = RunDir.open(tmp_path / RUN_ID)
    base = AutoModelForCausalLM.from_pretrained(project / "base", dtype=torch.float32)
    get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(rd.stage_dir("train") / "adapter")
    mark(rd, "train", {"method": "prompt_tuning", "adapter_dir": "train/adapter"})
    mark(rd, "merge", {"status": "not_applicable", "reason": "virtual tokens"}, status="not_applicable")
    mark(rd, "gguf", {"status": "not_applicable", "reason": "nothing merged"}, status="not_applicable")
    write_cards(rd, ("adapter",))
    recipe = make_recipe(project, method={"name": "prompt_tuning"}, publish=unique_publish("pt"))
    result = publish.run(recipe, rd)
    assert set(result["repos"]) == {"adapter"}
    assert not api.repo_exists(recipe.publish.merged_repo) and not api.repo_exists(recipe.publish.gguf_repo)
    local = snapshot_download(recipe.publish.adapter_repo, endpoint=env.endpoint, cache_dir=tmp_path / "dl")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(project / "base"), local)
    assert model.peft_config["default"].num_virtual_tokens == 4


# ---------------------------------------------------------------- dry run
def test_dry_run_lists_every_file_and_uploads_nothing(env, api, project, run_dir, tmp_path):
    recipe = make_recipe(project, publish=unique_publish("dry"))
    before = env.stats.snapshot()
    rows = publish.dry_run(recipe, run_dir)
    assert {r["repo_id"] for r in rows} == {recipe.publish.adapter_repo, recipe.publish.merged_repo, recipe.publish.gguf_repo}
    for r in rows:
        assert r["size"] == Path(r["local_path"]).stat().st_size > 0
    assert sum(r["path_in_repo"] == "README.md" for r in rows) == 3
    assert env.stats.snapshot() == before and not api.repo_exists(recipe.publish.merged_repo)

    # the same through the CLI: `hubforge run RECIPE --publish --dry-run`
    from typer.testing import CliRunner

    from hubforge.cli import app

    recipe_file = project / "dry.yaml"
    recipe_file.write_text(yaml.safe_dump({**RAW, "publish": {k: getattr(recipe.publish, k) for k in ("adapter_repo", "merged_repo", "gguf_repo")}}))
    out = CliRunner().invoke(app, ["run", str(recipe_file), "--publish", "--dry-run", "--run-dir", str(run_dir.path), "--json"])
    assert out.exit_code == 0, out.output
    assert sorted((r["repo_id"], r["path_in_repo"], r["size"]) for r in json.loads(out.output)) == \
        sorted((r["repo_id"], r["path_in_repo"], r["size"]) for r in rows)
    assert env.stats.snapshot() == before

    # `full` fine-tuning has no adapter: merged + GGUF only
    rd = clone(run_dir, tmp_path)
    shutil.rmtree(rd.path / "train" / "adapter")
    shutil.copytree(rd.path / "merge" / "model", rd.path / "train" / "model")
    mark(rd, "train", {"method": "full", "model_dir": "train/model"})
    full = make_recipe(project, method={"name": "full"}, publish=unique_publish("full"))
    assert {r["kind"] for r in publish.dry_run(full, rd)} == {"merged", "gguf"}


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("breakage, gate", [
    ("card_pending", "card validated"), ("card_not_validated", "card validated"), ("merge_failed", "merge verification"),
    ("merge_over_threshold", "merge verification"), ("gguf_failed", "gguf verification"), ("edited_after", "outputs unchanged"),
    ("card_for_other_repo", "card validated"), ("train_interrupted", "train"), ("token_in_card", "card validated"),
])
def test_gates_refuse_and_name_the_failed_gate(env, api, project, run_dir, tmp_path, breakage, gate):
    rd = clone(run_dir, tmp_path)
    stages = rd.manifest["stages"]
    if breakage == "card_pending":
        del stages["card"]
    elif breakage == "card_not_validated":
        stages["card"]["result"]["validated"] = False
    elif breakage in ("merge_failed", "gguf_failed"):
        stages[breakage.split("_")[0]]["status"] = "failed"
    elif breakage == "card_for_other_repo":
        stages["card"]["result"]["repos"] = {"merged": "someone/else"}
    elif breakage == "token_in_card":  # same size as before, so only reading the card catches it
        card = rd.path / "card" / "merged" / "README.md"
        text = card.read_text()
        card.write_text(text[:-40] + "hf_" + "T" * 36 + text[-1:])
    elif breakage == "train_interrupted":
        stages["train"]["status"] = "interrupted"
    elif breakage == "merge_over_threshold":
        stages["merge"]["result"]["max_abs_logit_diff"] = 0.9
    else:
        (rd.path / "merge" / "model" / "config.json").write_text("{}")
    rd.save()
    recipe = make_recipe(project, publish=unique_publish("gate"))
    with pytest.raises(StageError, match=f"gate '{gate}'"):
        publish.run(recipe, rd)
    with pytest.raises(StageError, match=f"gate '{gate}'"):
        publish.dry_run(recipe, rd)
    assert not any(api.repo_exists(r) for r in (recipe.publish.adapter_repo, recipe.publish.merged_repo, recipe.publish.gguf_repo))


def test_preflight_refusals_never_show_the_token(env, hub, project, monkeypatch):
    from huggingface_hub import constants

    recipe = make_recipe(project)
    assert publish.preflight(recipe)["user"] == "hubforge"

    def refused(pattern: str, secret: str | None = None, r=recipe):
        with pytest.raises(StageError, match=pattern) as info:
            publish.preflight(r)
        if secret:
            assert secret not in str(info.value)

    wrong = "hf_" + "Q" * 34
    monkeypatch.setenv("HF_TOKEN", wrong)
    refused("whoami", wrong)
    reader = hub.create_user("reader", "read")
    monkeypatch.setenv("HF_TOKEN", reader)
    refused("read-only", reader, make_recipe(project, publish={"namespace": "reader"}))
    alice = hub.create_user("alice", "write")
    monkeypatch.setenv("HF_TOKEN", alice)
    refused("neither the token's user nor one of its organisations", alice)  # recipe namespace: hubforge
    bob = hub.create_user("bob", "write", orgs=["bob-lab"])
    monkeypatch.setenv("HF_TOKEN", bob)
    assert publish.preflight(make_recipe(project, publish={"namespace": "bob-lab"}, space={"enabled": False}))["user"] == "bob"
    bad = dataclasses.replace(recipe, publish=dataclasses.replace(recipe.publish, merged_repo="hubforge/bad name!!"))
    refused("not a legal Hub repo id", r=bad)
    monkeypatch.delenv("HF_TOKEN")
    refused("no Hugging Face token")
    monkeypatch.setenv("HF_TOKEN", bob)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    refused("HF_HUB_DISABLE_XET=1")


def test_write_access_rules_follow_the_hubs_whoami():
    token = lambda role, **extra: {"accessToken": {"role": role, **extra}}  # noqa: E731
    user = {"name": "ana", "orgs": [{"name": "lab", "roleInOrg": "write"}, {"name": "club", "roleInOrg": "read"}]}
    assert hubclient.write_access({**user, "auth": token("write")}, "ana") is None
    assert hubclient.write_access({**user, "auth": token("write")}, "lab") is None
    assert "read' role" in hubclient.write_access({**user, "auth": token("write")}, "club")
    assert "neither" in hubclient.write_access({**user, "auth": token("write")}, "zed")
    assert "read-only" in hubclient.write_access({**user, "auth": token("read")}, "ana")
    scoped = {"fineGrained": {"scoped": [{"entity": {"type": "org", "name": "lab"}, "permissions": ["repo.content.read", "repo.write"]}]}}
    assert hubclient.write_access({**user, "auth": token("fineGrained", **scoped)}, "lab") is None
    assert "repo.write" in hubclient.write_access({**user, "auth": token("fineGrained", **scoped)}, "ana")


def test_only_the_hugging_face_hub_counts_as_the_real_hub(monkeypatch):
    assert hubclient.is_hf_host("https://huggingface.co") and hubclient.is_hf_host("https://hub-ci.huggingface.co")
    assert not hubclient.is_hf_host("http://127.0.0.1:8088") and not hubclient.is_hf_host("https://huggingface.co.evil.example")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    from huggingface_hub import constants

    assert hubclient.endpoint() == constants.ENDPOINT.rstrip("/")  # unset: whatever the client uses (huggingface.co)


def test_preflight_reports_an_unreachable_hub(env, project, monkeypatch, token):
    monkeypatch.setattr(hubclient, "RETRY_DELAYS", (0.1, 0.1))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StageError, match="failed against http://127.0.0.1:9") as info:
        publish.preflight(make_recipe(project))
    assert token not in str(info.value)


def test_private_repos_are_invisible_to_others(env, api, hub, project, run_dir, tmp_path):
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    recipe = make_recipe(project, publish=unique_publish("priv", private=True))
    result = publish.run(recipe, run_dir)
    outsider = HfApi(endpoint=hub.endpoint, token=hub.create_user("mallory", "write"))
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    for info in result["repos"].values():
        assert api.repo_info(info["repo_id"]).private is True
        assert not outsider.repo_exists(info["repo_id"]) and not anonymous.repo_exists(info["repo_id"])
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(recipe.publish.gguf_repo, endpoint=hub.endpoint, token=False, cache_dir=tmp_path / "dl")


def test_interrupted_publish_retries_and_completes_without_duplicates(project, run_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from hubforge.hub import Limits, serve

    # A Hub that refuses files over 5 MB: the adapter lands, the merged model's 14 MB safetensors stops the run.
    data = tmp_path / "hub"
    small = serve(data, limits=Limits(max_file_bytes=5 * 2**20))
    port, tok = small.port, small.token_path.read_text().strip()
    point_client_at(monkeypatch, small.endpoint, tok, tmp_path / "home")
    monkeypatch.setattr(hubclient, "RETRY_DELAYS", (0.5, 1.0, 1.0, 2.0))
    recipe = make_recipe(project)
    try:
        with pytest.raises(StageError, match="committing to hubforge/tiny-pub failed"):
            publish.run(recipe, run_dir)
    finally:
        small.stop()
    # The Hub is down when the re-run starts and comes back a moment later: the client's calls are retried.
    restarted = {}
    timer = threading.Timer(1.0, lambda: restarted.setdefault("hub", serve(data, port=port)))
    timer.start()
    try:
        result = publish.run(recipe, run_dir)
    finally:
        timer.join()
        restarted["hub"].stop() if "hub" in restarted else None
    assert "retrying" in capsys.readouterr().out
    assert result["repos"]["adapter"]["uploaded"] is False  # committed before the interruption, not again
    assert result["repos"]["merged"]["uploaded"] and result["repos"]["gguf"]["uploaded"]
    hub = serve(data, port=port)
    try:
        api = HfApi(endpoint=hub.endpoint, token=tok)
        for info in result["repos"].values():
            assert len(api.list_repo_commits(info["repo_id"])) == 2  # initial + one publish commit, no duplicates
    finally:
        hub.stop()


def test_retry_helper_backs_off_on_5xx_and_gives_up_cleanly_on_4xx():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    secret = "hf_" + "S" * 34

    def http_error(code: int) -> HfHubHTTPError:
        response = httpx2.Response(code, request=httpx2.Request("POST", "http://127.0.0.1:1/api/x"))
        return HfHubHTTPError(f"{code} for token {secret}", response=response)

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise http_error(503)
        return "ok"

    assert hubclient.with_retries(flaky, "flaky", delays=(0.01, 0.01, 0.01)) == "ok" and len(calls) == 3
    calls.clear()

    def forbidden():
        calls.append(1)
        raise http_error(403)

    with pytest.raises(StageError, match="forbidden failed") as info:
        hubclient.with_retries(forbidden, "forbidden", token=secret, delays=(0.01, 0.01))
    assert len(calls) == 1 and secret not in str(info.value)
