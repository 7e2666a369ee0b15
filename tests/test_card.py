"""The card stage refuses wrong cards: broken metadata fixtures, licence conflicts, method mix-ups, secrets, and
metadata that does not survive the round trip through the rendered README. Fast: fixed fake run directories."""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from hubforge.recipe import find_recipes

from hubforge import cardmeta, cardtext
from hubforge.pipeline import StageError
from hubforge.recipe import resolve
from hubforge.rundir import RunDir
from hubforge.stages import card

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cards"
BROKEN = sorted((FIXTURES / "broken").glob("*.md"))


def raw_recipe(name: str) -> dict:
    return yaml.safe_load((FIXTURES / "recipes" / f"{name}.yaml").read_text("utf-8"))


def make(name: str, tmp_path: Path, edit_recipe=None, edit_manifest=None, edit_results=None):
    """(recipe, run_dir) from a fixture, optionally edited; the run dir is a fresh copy under tmp_path."""
    raw = raw_recipe(name)
    if edit_recipe:
        edit_recipe(raw)
    recipe = resolve(raw, root=FIXTURES, source=f"{name}.yaml")
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "runs" / name, run_dir)
    for path, edit in (("manifest.json", edit_manifest), ("evaluate/results.json", edit_results)):
        if edit:
            data = json.loads((run_dir / path).read_text("utf-8"))
            edit(data)
            (run_dir / path).write_text(json.dumps(data, ensure_ascii=False), "utf-8")
    return recipe, RunDir.open(run_dir)


def front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---\n", 2)[1])


# ---------------------------------------------------------------- broken metadata fixtures
@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_card_is_rejected_naming_the_field(path):
    text = path.read_text("utf-8")
    expected = re.search(r"^# expect: (\S+)$", text, re.M).group(1)
    with pytest.raises(StageError) as err:
        card.check_card(text, "adapter")
    assert re.search(rf"(^|\s){re.escape(expected)}:", str(err.value), re.M), str(err.value)


def test_broken_fixtures_fail_only_for_their_own_mistake():
    for path in BROKEN:
        text = path.read_text("utf-8")
        expected = re.search(r"^# expect: (\S+)$", text, re.M).group(1)
        problems = cardmeta.metadata_problems(front_matter(text))
        library = front_matter(text).get("library_name")
        # every reported field is the expected one or follows from it (licence -> license missing, etc.)
        assert all(p.split(":")[0] in (expected, "license", "license_link", "base_model_relation") for p in problems), problems
        assert library in ("peft", "transformers")


def test_other_licence_with_name_and_link_is_valid():
    meta = {"base_model": "someone/base", "library_name": "peft", "license": "other", "license_name": "acme-model-1.0",
            "license_link": "https://example.com/licence", "pipeline_tag": "text-generation", "tags": ["hubforge"],
            "base_model_relation": "adapter", "language": ["fa", "eng"]}
    assert cardmeta.metadata_problems(meta) == []
    assert cardmeta.metadata_problems({**meta, "license": "mit"})[0].startswith("license_link: only allowed with license: other")


def test_misspelt_licence_key_is_accepted_by_huggingface_hub_but_not_by_us():
    text = (FIXTURES / "broken" / "misspelt-licence-key.md").read_text("utf-8")
    assert ModelCard(text).data.to_dict()["licence"] == "gemma"  # the library keeps the typo silently
    with pytest.raises(StageError, match="did you mean 'license'"):
        card.check_card(text, "adapter")


# ---------------------------------------------------------------- round trip and model-index
def test_rendered_cards_round_trip_through_huggingface_hub(tmp_path):
    recipe, run_dir = make("persian-chat-lora", tmp_path)
    results = json.loads((run_dir.path / "evaluate/results.json").read_text("utf-8"))
    card.run(recipe, run_dir)
    for kind in ("adapter", "merged", "gguf"):
        text = (run_dir.path / "card" / kind / "README.md").read_text("utf-8")
        data = cardmeta.card_metadata(kind, recipe, run_dir.manifest, results)
        parsed = ModelCard(text).data
        assert parsed.to_dict() == data.to_dict()
        assert (parsed.eval_results or []) == (data.eval_results or [])
        assert front_matter(text)["library_name"] == {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[kind]


def test_model_index_holds_each_cards_own_tuned_numbers(tmp_path):
    def adapter_rows(results):  # the eval stage may also report the adapter itself; the adapter card then prefers it
        results["summary"] += [{**row, "tuned_model": "adapter", "tuned": row["tuned"] * 0.99}
                               for row in results["summary"] if row["section"] == "perplexity"]
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_results=adapter_rows)
    card.run(recipe, run_dir)
    summary = json.loads((run_dir.path / "evaluate/results.json").read_text("utf-8"))["summary"]
    for kind, model in (("adapter", "adapter"), ("merged", "merged")):
        evals = ModelCard((run_dir.path / "card" / kind / "README.md").read_text("utf-8")).data.eval_results
        ppl = next(e for e in evals if e.metric_type == "perplexity")
        assert ppl.metric_value == next(r["tuned"] for r in summary if r["metric"] == "perplexity" and r["tuned_model"] == model)
        assert "measured on" not in ppl.metric_name and ppl.dataset_revision and ppl.dataset_split
    # lm-eval ran on the merged model only: the adapter card reports it and says so
    acc = next(e for e in ModelCard((run_dir.path / "card/adapter/README.md").read_text("utf-8")).data.eval_results
               if e.metric_type == "acc")
    assert acc.metric_name.endswith("measured on the merged model)")
    gguf = front_matter((run_dir.path / "card/gguf/README.md").read_text("utf-8"))
    assert gguf["base_model"] == recipe.publish.merged_repo and gguf["base_model_relation"] == "quantized"
    metrics = gguf["model-index"][0]["results"][0]["metrics"]
    files = run_dir.result("gguf")["files"]
    assert [(m["config"], m["value"]) for m in metrics] == [(f["type"], f["perplexity"]) for f in files]
    adapter = front_matter((run_dir.path / "card/adapter/README.md").read_text("utf-8"))
    assert gguf["model-index"][0]["results"][0]["dataset"] == adapter["model-index"][0]["results"][0]["dataset"]


def test_template_that_drops_metadata_fails_the_round_trip(tmp_path, monkeypatch):
    fake = tmp_path / "cards"
    shutil.copytree(cardmeta.cards_dir(), fake)
    template = fake / "templates" / "adapter.md.j2"
    # a template that writes its own front matter instead of {{ card_data }} loses fields
    template.write_text(template.read_text("utf-8").replace("{{ card_data }}", "license: gemma\nlibrary_name: peft\n"
                                                            "base_model: google/gemma-3-270m\nbase_model_relation: adapter\n"
                                                            "pipeline_tag: text-generation\ntags: [hubforge]"), "utf-8")
    monkeypatch.setattr(card, "cards_dir", lambda: fake)
    recipe, run_dir = make("persian-chat-lora", tmp_path)
    with pytest.raises(StageError, match="did not survive the round trip"):
        card.run(recipe, run_dir)


def test_language_no_survives_yaml(tmp_path):
    # `no` (Norwegian) is a boolean in YAML 1.1; the round trip would catch a dump that does not quote it
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_recipe=lambda r: r["card"].update(languages=["no", "fa"]))
    card.run(recipe, run_dir)
    assert front_matter((run_dir.path / "card/adapter/README.md").read_text("utf-8"))["language"] == ["no", "fa"]


def test_invalid_language_from_recipe_is_named(tmp_path):
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_recipe=lambda r: r["card"].update(languages=["xx"]))
    with pytest.raises(StageError, match=r"language\[0\].*card\.languages"):
        card.run(recipe, run_dir)


def test_non_finite_metric_is_refused(tmp_path):
    def nan(results):
        results["summary"][1]["tuned"] = math.nan
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_results=nan)
    with pytest.raises(StageError, match="not a finite number"):
        card.run(recipe, run_dir)


def test_results_that_break_the_eval_schema_are_refused(tmp_path):
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_results=lambda r: r["summary"][0].pop("higher_is_better"))
    with pytest.raises(StageError, match=r"evaluate/results.json.summary\[0\]"):
        card.run(recipe, run_dir)


def test_failed_measurement_is_reported_not_dropped(tmp_path):
    recipe, run_dir = make("dolly-prompt-tuning", tmp_path)
    card.run(recipe, run_dir)
    text = (run_dir.path / "card/adapter/README.md").read_text("utf-8")
    assert "Not measured: lm_eval: failed" in text


# ---------------------------------------------------------------- method honesty
def test_prompt_tuned_adapter_card_says_prompt_tuning_not_lora(tmp_path):
    recipe, run_dir = make("dolly-prompt-tuning", tmp_path)
    result = card.run(recipe, run_dir)
    assert set(result["cards"]) == {"adapter"}  # nothing to merge, no GGUF
    text = (run_dir.path / "card/adapter/README.md").read_text("utf-8")
    meta = front_matter(text)
    assert "prompt-tuning" in meta["tags"] and "lora" not in meta["tags"]
    assert "use_cache=False" in text and "20 virtual tokens" in text
    assert "This is a prompt tuning adapter, not LoRA." in text
    assert "LoRA rank" not in text and "PeftModel.from_pretrained" in text
    lora_recipe, lora_run = make("persian-chat-lora", tmp_path / "lora")
    card.run(lora_recipe, lora_run)
    assert "use_cache=False" not in (lora_run.path / "card/adapter/README.md").read_text("utf-8")


def test_recipe_tag_naming_another_method_is_refused(tmp_path):
    recipe, run_dir = make("dolly-prompt-tuning", tmp_path, edit_recipe=lambda r: r["card"]["tags"].append("lora"))
    with pytest.raises(StageError, match=r"card\.tags\[3\] 'lora'"):
        card.run(recipe, run_dir)


# ---------------------------------------------------------------- licences
def test_gemma_derivative_inherits_gemma_with_the_terms_notice(tmp_path):
    recipe, run_dir = make("persian-chat-lora", tmp_path)
    card.run(recipe, run_dir)
    for kind in ("adapter", "merged", "gguf"):
        text = (run_dir.path / "card" / kind / "README.md").read_text("utf-8")
        assert front_matter(text)["license"] == "gemma"
        assert "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms" in text


def test_conflicting_card_licence_is_an_error(tmp_path):
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_recipe=lambda r: r["card"].update(license="apache-2.0"))
    with pytest.raises(StageError, match=r"card\.license 'apache-2.0' conflicts .*'gemma'"):
        card.run(recipe, run_dir)


def test_base_licence_contradicting_the_known_one_is_an_error(tmp_path):
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_recipe=lambda r: r["base"].update(license="mit"))
    with pytest.raises(StageError, match=r"base\.license 'mit'"):
        card.run(recipe, run_dir)


def test_permissive_base_allows_a_compatible_card_licence(tmp_path):
    def edit(r):
        r["base"] = {"model": "someone/permissive-base", "license": "apache-2.0"}
        r["card"]["license"] = "mit"
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_recipe=edit)
    card.run(recipe, run_dir)
    meta = front_matter((run_dir.path / "card/merged/README.md").read_text("utf-8"))
    assert meta["license"] == "mit" and meta["base_model"] == "someone/permissive-base"


def test_unknown_base_licence_must_be_stated(tmp_path):
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_recipe=lambda r: r.update(base={"model": "someone/mystery"}))
    with pytest.raises(StageError, match=r"base\.license: the licence of someone/mystery"):
        card.run(recipe, run_dir)


def test_llama_3_1_derivative_inherits_llama_terms_and_naming_rule(tmp_path):
    def llama(r):
        r["base"] = {"model": "meta-llama/Llama-3.1-8B", "revision": "main"}
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_recipe=llama)
    with pytest.raises(StageError, match=r"publish\.adapter_repo .*begin with \"Llama\""):
        card.run(recipe, run_dir)

    def llama_named(r):
        llama(r)
        r["name"] = "llama-3.1-8b-persian-chat"
    recipe, run_dir = make("persian-chat-lora", tmp_path / "named", edit_recipe=llama_named)
    card.run(recipe, run_dir)
    text = (run_dir.path / "card/merged/README.md").read_text("utf-8")
    assert front_matter(text)["license"] == "llama3.1"
    assert "Built with Llama" in text and "Llama 3.1 is licensed under the Llama 3.1 Community License" in text


def test_local_base_needs_its_hub_id(tmp_path):
    root = tmp_path / "project"
    shutil.copytree(FIXTURES / "data", root / "data")
    (root / "base").mkdir()
    raw = raw_recipe("persian-chat-lora")
    raw["base"] = {"model": "./base"}
    recipe = resolve(raw, root=root)
    with pytest.raises(StageError, match=r"base\.model './base'.*hubforge-base\.json"):
        cardmeta.base_facts(recipe)
    (root / "base" / "hubforge-base.json").write_text(json.dumps({"hub_id": "google/gemma-3-270m", "license": "gemma"}))
    assert cardmeta.base_facts(recipe)["hub_id"] == "google/gemma-3-270m"


# ---------------------------------------------------------------- secrets, citation, outputs, Space README
def test_token_in_eval_samples_stops_the_card(tmp_path):
    def leak(results):
        results["samples"]["items"][0]["outputs"]["merged"] = "my key is hf_abcdefghijklmnop1234"
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_results=leak)
    with pytest.raises(StageError, match="access token"):
        card.run(recipe, run_dir)


def test_citation_year_is_the_year_the_model_was_trained(tmp_path):
    def year(manifest):
        manifest["stages"]["train"]["ended_at"] = "2024-03-01T10:00:00+00:00"
    recipe, run_dir = make("dolly-prompt-tuning", tmp_path, edit_manifest=year)
    card.run(recipe, run_dir)
    text = (run_dir.path / "card/adapter/README.md").read_text("utf-8")
    assert "year         = {2024}" in text and "_2024," in text


def test_stage_writes_only_its_cards_and_removes_stale_ones(tmp_path):
    recipe, run_dir = make("dolly-prompt-tuning", tmp_path)
    stale = run_dir.stage_dir("card") / "gguf" / "README.md"
    stale.parent.mkdir()
    stale.write_text("old")
    before = {p for p in run_dir.path.rglob("*") if p.is_file() and "card" not in p.parts}
    result = card.run(recipe, run_dir)
    assert result == {"cards": {"adapter": "card/adapter/README.md"}, "repos": {"adapter": recipe.publish.adapter_repo},
                      "license": "gemma", "validated": True}
    assert not stale.exists()
    assert {p for p in run_dir.path.rglob("*") if p.is_file() and "card" not in p.parts} == before


def test_space_readme_front_matter(tmp_path):
    from importlib import metadata

    recipe, run_dir = make("persian-chat-lora", tmp_path)
    text = card.render_space_readme(recipe, run_dir)
    meta = front_matter(text)
    assert list(meta) == ["title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "license",
                          "short_description", "models"]
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == metadata.version("gradio") and meta["app_file"] == "app.py"
    assert meta["models"] == [recipe.publish.merged_repo, recipe.publish.gguf_repo, recipe.publish.adapter_repo]
    assert meta["license"] == "gemma" and len(meta["short_description"]) <= 60 and meta["title"] == recipe.space.title
    assert "Gemma Terms of Use" in text


def test_card_metadata_is_pure(tmp_path):
    recipe, run_dir = make("persian-chat-lora", tmp_path)
    manifest = copy.deepcopy(run_dir.manifest)
    results = json.loads((run_dir.path / "evaluate/results.json").read_text("utf-8"))
    first = cardmeta.card_metadata("merged", recipe, manifest, results).to_dict()
    assert cardmeta.card_metadata("merged", recipe, manifest, results).to_dict() == first
    assert manifest == run_dir.manifest


# ---------------------------------------------------------------- every shipped recipe
SHIPPED = find_recipes([Path(__file__).resolve().parents[1] / "recipes"])  # what `hubforge validate recipes/` reads


def synthetic_manifest(recipe) -> dict:
    """What a finished run of `recipe` would record, with made-up numbers (no evaluation)."""
    adapter = recipe.method.is_adapter
    train = {"method": recipe.method.name, ("adapter_dir" if adapter else "model_dir"): "train/x", "steps": 10, "epochs": 1.0,
             "tokens_seen": 1000, "train_loss": 1.5, "seconds": 60.0, "peak_rss_mb": 100.0, "trainable_params": 10,
             "total_params": 1000, "hardware": {"device": "cpu", "cpu_threads": 2, "cpus": 2}, "precision": recipe.train.precision}
    merged = recipe.method.is_mergeable and recipe.export.merge
    data = {"rows_train": 9, "rows_eval": 1, "fingerprint": "ab" * 32, "format": recipe.data.format}
    merge = {"model_dir": "merge/model", "dtype": recipe.export.merge_dtype, "merge_into": "original"}
    stages = {"data": {"status": "done", "result": data},
              "train": {"status": "done", "ended_at": "2026-01-02T00:00:00+00:00", "result": train},
              "merge": {"status": "done", "result": merge} if merged else {"status": "not_applicable", "result": {}}}
    if merged and recipe.export.gguf.enabled:
        stages["gguf"] = {"status": "done", "result": {"files": [
            {"file": f"gguf/{recipe.name}-{t}.gguf", "type": t, "size": 1000, "sha256": "cd" * 32, "bits_per_weight": 8.0,
             "perplexity": 10.0, "delta_ppl_vs_f16": 0.1, "tokens_per_s": 50.0, "greedy_agreement": 0.9}
            for t in (recipe.export.gguf.outtype, *recipe.export.gguf.quants)]}}
    return {"hubforge_version": "0.1.0", "git_commit": None, "libraries": {}, "stages": stages}


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED])
def test_every_shipped_recipe_renders_valid_cards(path):
    from hubforge.recipe import load_recipe

    recipe = load_recipe(path)
    manifest = synthetic_manifest(recipe)
    kinds = [k for k in cardmeta.KINDS if k in cardmeta.repos(recipe, manifest)]
    assert kinds[0] == ("adapter" if recipe.method.is_adapter else "merged")
    for kind in kinds:
        text = card.render_card(kind, recipe, manifest, {})
        assert front_matter(text)["license"] == cardmeta.base_facts(recipe)["license"]
        assert cardtext.METHOD_EXPLAINED[recipe.method.name] in text
        assert "\n\n\n" not in text, kind  # the templates keep Markdown tidy whatever is absent


def test_space_readme_lists_the_published_repos(tmp_path):
    def published(manifest):
        manifest["stages"]["publish"] = {"status": "done", "result": {"repos": {
            "gguf": {"repo_id": "someone/x-GGUF"}, "merged": {"repo_id": "someone/x"}}}}
    recipe, run_dir = make("persian-chat-lora", tmp_path, edit_manifest=published)
    assert front_matter(card.render_space_readme(recipe, run_dir))["models"] == ["someone/x", "someone/x-GGUF"]
