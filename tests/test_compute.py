"""The `compute` section (fast; no model is loaded): the accelerate config of every strategy is accepted by
accelerate's own launcher code and a broken one is not, QLoRA under FSDP stores its 4-bit weights in the compute
dtype, DeepSpeed is refused with the install command when missing, and `plan` estimates memory per strategy."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

from hubforge import compute, plan
from hubforge.errors import StageError
from hubforge.models import bnb_config
from hubforge.recipe import RecipeError, load_recipe

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
LORA = REPO / "recipes" / "gemma-3-270m" / "persian-chat-lora.yaml"
BIG_QLORA = REPO / "recipes" / "gemma-3-12b-it" / "turkish-alpaca-qlora.yaml"


def recipe(path=LORA, extra=(), **compute_section):
    return load_recipe(path, overrides=[f"compute.{k}={v}" for k, v in compute_section.items()] + list(extra))


def saved(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")
    return path


def test_one_process_is_the_default_and_is_written_out():
    r = recipe()
    assert (r.compute.processes, r.compute.strategy) == (1, "ddp") and not compute.launches(r)
    # like every other default, written out in the resolved recipe (and so part of its hash)
    assert r.to_dict()["compute"] == {"processes": 1, "strategy": "ddp"}
    assert recipe(processes=2).to_dict()["compute"] == {"processes": 2, "strategy": "ddp"}
    with pytest.raises(RecipeError, match=r"compute\.strategy: 'zero9' is not one of ddp, fsdp"):
        recipe(processes=2, strategy="zero9")


@pytest.mark.parametrize("strategy", compute.STRATEGIES)
@pytest.mark.parametrize("path", [LORA, BIG_QLORA], ids=["lora", "qlora"])
def test_every_strategy_gives_a_config_accelerate_accepts(tmp_path, strategy, path):
    r = recipe(path, processes=4, strategy=strategy)
    args = compute.check_config(saved(tmp_path, compute.accelerate_config(r, cpu=True)))
    assert args["num_processes"] == 4
    assert args["use_fsdp"] == (strategy == "fsdp") and args["use_deepspeed"] == strategy.startswith("deepspeed")
    assert args["multi_gpu"] == (strategy == "ddp")  # torchrun starts the ranks; ACCELERATE_USE_CPU makes them gloo
    if strategy == "fsdp":
        assert args["fsdp_sharding_strategy"] == "FULL_SHARD" and args["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert args["fsdp_use_orig_params"] == (r.method.name != "qlora")
    if strategy.startswith("deepspeed"):
        assert args["zero_stage"] == int(strategy[-1]) and args["gradient_accumulation_steps"] == r.train.grad_accum


def test_a_broken_config_is_refused_by_accelerate(tmp_path):
    config = compute.accelerate_config(recipe(processes=2, strategy="fsdp"), cpu=True)
    with pytest.raises(ValueError, match="unknown keys"):
        compute.check_config(saved(tmp_path, dict(config, num_gpus=2)))
    config["fsdp_config"]["fsdp_sharding_strategy"] = "HALF_SHARD"
    with pytest.raises((ValueError, KeyError)):
        compute.check_config(saved(tmp_path, config))


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype():
    fsdp = recipe(BIG_QLORA, processes=2, strategy="fsdp")
    assert compute.quant_storage(fsdp) == fsdp.method.quantization.compute_dtype == "bfloat16"
    import torch

    assert bnb_config(fsdp.method, compute.quant_storage(fsdp)).bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config(fsdp.method).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default elsewhere
    assert compute.quant_storage(recipe(BIG_QLORA, processes=2, strategy="ddp")) is None
    assert compute.quant_storage(recipe(processes=2, strategy="fsdp")) is None  # not qlora
    assert any("bnb_4bit_quant_storage" in w for w in plan.build_plan(fsdp)["warnings"])
    mismatched = load_recipe(BIG_QLORA, overrides=["compute.processes=2", "compute.strategy=fsdp", "base.dtype=float32"])
    with pytest.raises(StageError, match="base.dtype must be bfloat16 too, not float32"):
        compute.check_launchable(mismatched, cuda=True)
    compute.check_launchable(dataclasses.replace(mismatched, base=dataclasses.replace(mismatched.base, dtype="bfloat16")),
                             cuda=True)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed here")
def test_deepspeed_is_refused_with_the_install_command():
    with pytest.raises(StageError, match="pip install deepspeed"):
        compute.check_launchable(recipe(processes=2, strategy="deepspeed_zero3"), cuda=True)
    compute.check_launchable(recipe(processes=1, strategy="deepspeed_zero3"), cuda=True)  # one process launches nothing
    compute.check_launchable(recipe(processes=2, strategy="fsdp"), cuda=True)


def test_sharding_strategies_are_refused_without_gpus():
    """accelerate applies FSDP and DeepSpeed to GPU processes only; on CPU it would train plain DDP under their name."""
    with pytest.raises(StageError, match="needs GPUs.*compute.strategy: ddp"):
        compute.check_launchable(recipe(processes=2, strategy="fsdp"), cuda=False)
    compute.check_launchable(recipe(processes=2, strategy="ddp"), cuda=False)


def test_plan_estimates_memory_per_strategy_and_what_fits_each_gpu():
    big_batch = ["train.batch_size=8"]
    r = recipe(BIG_QLORA, big_batch)
    p = plan.build_plan(r)
    s, single = p["estimates"]["strategies"], p["estimates"]["gpu_memory"]
    per = s["per_gpu_gib"]
    assert s["processes"] == 2 and per["ddp"] == single["total_gib"]
    assert per["fsdp"] == per["deepspeed_zero3"] < per["deepspeed_zero2"] < per["ddp"]  # what each one shards
    # the 12B QLoRA at batch 8 x 4,096 fits one 80 GiB GPU but needs sharding over several 24 GiB ones
    assert s["fits"]["80GiB"] == {"strategy": "single", "processes": 1, "per_gpu_gib": single["total_gib"]}
    fit24 = s["fits"]["24GiB"]
    assert fit24 is None or (fit24["strategy"] == "fsdp" and fit24["processes"] > 1 and fit24["per_gpu_gib"] <= 24)
    assert plan.build_plan(recipe(BIG_QLORA))["estimates"]["strategies"]["fits"]["24GiB"]["processes"] == 1  # as shipped
    four = plan.build_plan(recipe(BIG_QLORA, big_batch, processes=4, strategy="fsdp"))["estimates"]["gpu_memory"]
    parts, whole = four["parts_gib"], single["parts_gib"]
    assert parts["weights"] == pytest.approx(whole["weights"] / 4, abs=0.01) and parts["loss_head"] == whole["loss_head"]
    text = plan.plan_text(recipe(BIG_QLORA, processes=4, strategy="fsdp"))
    assert "per GPU (4 processes, fsdp)" in text and "Fits on" in text and "80 GiB: 1 GPU" in text
