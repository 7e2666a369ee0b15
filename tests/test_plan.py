"""`hubforge plan` works offline for every shipped recipe and says what a reviewer needs to know."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hubforge.cli import app
from hubforge.plan import build_plan, parameter_counts
from hubforge.recipe import find_recipes, load_recipe

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", find_recipes([REPO / "recipes"]), ids=lambda p: p.name)
def test_plan_every_recipe_in_every_format(path):
    for fmt in ("text", "markdown", "json"):
        result = CliRunner().invoke(app, ["plan", str(path), "--format", fmt])
        assert result.exit_code == 0, result.output
    plan = json.loads(CliRunner().invoke(app, ["plan", str(path), "--format", "json"]).output)
    assert plan["estimates"]["parameters"]["total"] > 100_000_000
    assert 0 < plan["estimates"]["parameters"]["trainable"] <= plan["estimates"]["parameters"]["total"]
    assert plan["estimates"]["gpu_memory"]["total_gib"] > 0


def test_embedded_plan_lists_repos_gguf_files_and_counts_tokens():
    plan = build_plan(load_recipe(REPO / "recipes/gemma-3-270m/persian-chat-lora.yaml"))
    assert plan["repos"] == {"adapter": "hubforge/gemma-3-270m-persian-chat-lora", "merged": "hubforge/gemma-3-270m-persian-chat",
                             "gguf": "hubforge/gemma-3-270m-persian-chat-GGUF"}
    assert "gemma-3-270m-persian-chat-Q4_K_M.gguf" in plan["gguf_files"]
    assert plan["estimates"]["train_tokens"]["tokens"] > 1000
    assert plan["space"] == "hubforge/gemma-3-270m-persian-chat-demo"


def test_lora_trainable_parameters_match_peft(tiny_base, make_recipe):
    """The plan's formula agrees exactly with PEFT on a real (tiny) model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hubforge.plan import architecture

    recipe = make_recipe(method={"name": "lora", "lora": {"r": 4}})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=4, target_modules=list(recipe.method.lora.target_modules)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = parameter_counts(recipe, architecture(recipe))
    assert counts["trainable"] == trainable
    base_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert abs(counts["total"] - base_total) / base_total < 0.01  # the formula ignores norm weights


def test_prompt_tuned_recipe_has_no_merged_or_gguf_repo_and_warns_about_unpinned_revisions():
    plan = build_plan(load_recipe(REPO / "recipes/gemma-3-270m/dolly-prompt-tuning.yaml"))
    assert plan["repos"]["merged"] is None and plan["repos"]["gguf"] is None and plan["gguf_files"] == []
    assert plan["repos"]["adapter"].endswith("-prompt-tuning")
    assert any("data.revision" in w for w in plan["warnings"])
    assert {s["name"]: s["applies"] for s in plan["stages"]}["merge"] is False


def test_plan_names_bad_data_rows_and_refuses_a_file_that_is_not_utf8(tmp_path):
    (tmp_path / "pyproject.toml").touch()  # the project root the recipe's paths are relative to
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mixed.jsonl").write_text('{"text": "hello"}\nnot json\n[1]\n{"text": "bye"}\n', "utf-8")
    (tmp_path / "data" / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    for name in ("mixed", "latin1"):
        (tmp_path / f"{name}.yaml").write_text(f"name: plan-{name}\nbase: {{model: 'embedded:gemma-3-270m'}}\n"
                                               f"data: {{files: [data/{name}.jsonl], format: text}}\nmethod: {{name: lora}}\n")
    mixed = CliRunner().invoke(app, ["plan", str(tmp_path / "mixed.yaml")])
    assert mixed.exit_code == 0, mixed.output
    assert ("2 records the data stage will skip: data/mixed.jsonl:2: not JSON (Expecting value at column 1); "
            "data/mixed.jsonl:3: a JSON list, not an object") in mixed.output
    bad = CliRunner().invoke(app, ["plan", str(tmp_path / "latin1.yaml")])
    assert bad.exit_code == 1
    assert "error: data.files: data/latin1.jsonl:2: not UTF-8 (byte 0xe9 at offset 28); save the file as UTF-8" in bad.output
    assert "Traceback" not in bad.output
