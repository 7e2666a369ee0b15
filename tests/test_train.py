"""Train stage translators and bookkeeping (unit tier: no training; models built from a tiny config).

    .venv/bin/python -m pytest tests/test_train.py -q -p no:cacheprovider
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hubforge import models, products
from hubforge.pipeline import StageError
from hubforge.recipe import resolve
from hubforge.stages import train

pytestmark = pytest.mark.unit


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.jsonl").write_text("{}\n", "utf-8")

    def make(method: dict | None = None, **train_section):
        raw = {"name": "train-test", "base": {"model": "./base"}, "data": {"files": ["data/chat.jsonl"], "format": "messages"},
               "method": method or {"name": "lora"}, "train": train_section}
        return resolve(raw, root=tmp_path, source="<test>")

    return make


def test_lora_config(recipe):
    r = recipe({"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                                         "use_rslora": True, "modules_to_save": ["lm_head"]}})
    cfg = models.peft_config(r)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora) == (4, 8, 0.1, True)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"} and cfg.modules_to_save == ["lm_head"]
    assert cfg.task_type == "CAUSAL_LM" and models.lora_config(r.method).bias == "none"
    assert models.bnb_config(r.method) is None


def test_qlora_bnb_config(recipe):
    import torch

    r = recipe({"name": "qlora", "quantization": {"compute_dtype": "float32", "double_quant": True}})
    q = models.bnb_config(r.method)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float32
    assert models.peft_config(r).r == 8  # qlora trains a LoRA on top


def test_prompt_learning_configs(recipe, tmp_path):
    pt = models.peft_config(recipe({"name": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 7, "init_text": "Answer:"}}), tmp_path)
    assert pt.num_virtual_tokens == 7 and pt.prompt_tuning_init == "TEXT"
    assert pt.prompt_tuning_init_text == "Answer:" and pt.tokenizer_name_or_path == str(tmp_path)
    assert models.peft_config(recipe({"name": "prompt_tuning"})).prompt_tuning_init == "RANDOM"
    pe = models.peft_config(recipe({"name": "p_tuning", "p_tuning": {"encoder_hidden_size": 64, "encoder_type": "LSTM"}}))
    assert pe.encoder_hidden_size == 64 and pe.encoder_reparameterization_type == "LSTM"
    assert models.peft_config(recipe({"name": "full"})) is None


def test_sft_config_maps_every_train_field(recipe, tmp_path):
    r = recipe(learning_rate=1e-3, max_steps=7, batch_size=3, grad_accum=2, max_length=100, optimizer="adafactor",
               scheduler="cosine", warmup_steps=2, weight_decay=0.1, max_grad_norm=0.5, gradient_checkpointing=True,
               seed=5, save_steps=3, save_total_limit=1, logging_steps=2, eval_steps=4)
    a = train.sft_config(r, tmp_path / "ckpt")
    assert (a.learning_rate, a.max_steps, a.per_device_train_batch_size, a.gradient_accumulation_steps) == (1e-3, 7, 3, 2)
    assert (a.optim.value, a.lr_scheduler_type.value, a.warmup_steps, a.weight_decay, a.max_grad_norm) == (
        "adafactor", "cosine", 2, 0.1, 0.5)
    assert a.activation_checkpointing and a.seed == 5 and a.data_seed == 5
    assert (a.save_steps, a.save_total_limit, a.logging_steps, a.eval_steps) == (3, 1, 2, 4)
    assert a.output_dir == str(tmp_path / "ckpt") and a.assistant_only_loss and not a.bf16 and not a.fp16
    # padding-free without packing: rows were fitted by the data stage, TRL must not re-truncate
    assert a.padding_free and not a.packing and a.max_length is None
    packed = train.sft_config(recipe(packing=True, max_length=100), tmp_path)
    assert packed.packing and packed.max_length == 100 and packed.packing_strategy == "bfd"
    assert not packed.activation_checkpointing and not packed.gradient_checkpointing  # SFTConfig would default to True
    padded = train.sft_config(recipe(padding_free=False, max_length=100), tmp_path)
    assert not padded.padding_free and padded.max_length == 100
    assert train.sft_config(recipe(max_steps=None, epochs=2), tmp_path).max_steps == -1


def test_prompt_learning_never_flattens_batches(recipe, tmp_path):
    a = train.sft_config(recipe({"name": "p_tuning"}, packing=True, padding_free=True), tmp_path)
    assert not a.packing and not a.padding_free  # virtual tokens are prepended per row


def test_precision_flags_only_where_supported():
    assert train.precision_flags("bf16", cuda=False, bf16_ok=True) == {"bf16": True, "fp16": False}
    assert train.precision_flags("fp16", cuda=False, bf16_ok=True) == {"bf16": False, "fp16": False}
    assert train.precision_flags("fp16", cuda=True, bf16_ok=True) == {"bf16": False, "fp16": True}
    assert train.precision_flags("bf16", cuda=True, bf16_ok=False) == {"bf16": False, "fp16": False}
    assert train.precision_flags("fp32", cuda=True, bf16_ok=True) == {"bf16": False, "fp16": False}


@pytest.fixture(scope="module")
def tiny_model():
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True))


def test_full_trains_all_or_only_named_modules(tiny_model):
    train.freeze_except(tiny_model, ())
    assert all(p.requires_grad for p in tiny_model.parameters())
    train.freeze_except(tiny_model, ("embed_tokens",))
    trained = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trained == ["model.embed_tokens.weight"]
    train.freeze_except(tiny_model, ("lm_head",))  # tied to embed_tokens: the shared weight trains
    assert tiny_model.lm_head.weight.requires_grad and tiny_model.model.embed_tokens.weight.requires_grad
    train.freeze_except(tiny_model, ("mlp",))
    assert {n.split(".")[-2] for n, p in tiny_model.named_parameters() if p.requires_grad} == {"gate_proj", "up_proj", "down_proj"}
    with pytest.raises(StageError, match="match no parameter"):
        train.freeze_except(tiny_model, ("vision_tower",))


def test_param_count_from_headers_and_disk_estimate(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path, safe_serialization=True)
    assert models.count_params(tmp_path) == sum(p.numel() for p in tiny_model.parameters())


def test_disk_check_counts_the_checkpoints_a_run_really_keeps():
    def recipe(method="full", **train):
        over = {"train.save_total_limit": 2, "train.save_steps": 50, **train}
        return resolve({"name": "disk-test", "base": {"model": "google/gemma-3-270m"}, "method": {"name": method},
                        "data": {"hub": "databricks/databricks-dolly-15k", "format": "alpaca"}}, overrides=[f"{k}={v}" for k, v in over.items()])

    n = 10**9
    # full: each checkpoint = fp32 weights + two fp32 Adam moments; the result = fp32 weights; 10 % slack
    assert train.disk_needed(recipe(), n, steps=1000) == int((12 * n * 2 + 4 * n) * 1.1)
    # a 2-step stand-in with save_steps 2 writes one checkpoint, whatever save_total_limit allows
    assert train.disk_needed(recipe(**{"train.save_steps": 2}), n, steps=2) == int((12 * n + 4 * n) * 1.1)
    assert products.checkpoints_kept(recipe(), 120) == 2 and products.checkpoints_kept(recipe(), 30) == 1
    assert products.checkpoints_kept(recipe(), None) == 2
    lora = train.disk_needed(recipe("lora"), n, steps=1000)
    assert lora < train.disk_needed(recipe(), n, steps=1000) / 10
    assert train.estimated_steps(recipe(**{"train.batch_size": 4, "train.grad_accum": 2, "train.epochs": 2}), 17) == 6


def test_resume_point_keeps_only_complete_checkpoints_of_the_same_inputs(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert train.resume_point(ckpt, "k1") is None
    for step, complete in ((5, True), (10, True), (15, False)):
        (ckpt / f"checkpoint-{step}").mkdir()
        if complete:
            (ckpt / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert train.resume_point(ckpt, "k1").name == "checkpoint-10"
    assert not (ckpt / "checkpoint-15").exists()  # killed while saving
    assert train.resume_point(ckpt, "k2") is None and not (ckpt / "checkpoint-10").exists()  # other inputs


def test_log_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0, "seconds": s * 2.0}) + "\n" for s in range(1, 8)))
    log = train.JsonlLog(path, upto_step=5)
    assert [r["step"] for r in train.read_jsonl(path)] == [1, 2, 3, 4, 5] and log.seconds_offset == 10.0
    train.JsonlLog(path, upto_step=0)
    assert path.read_text() == ""  # a fresh run starts a fresh log


def test_qlora_without_bitsandbytes_fails_before_loading(monkeypatch):
    real = models.importlib.import_module

    def fake(name, *a):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *a)

    monkeypatch.setattr(models.importlib, "import_module", fake)
    with pytest.raises(StageError, match="qlora needs a working bitsandbytes.*method.name: lora"):
        models.check_bitsandbytes()


class FakeRunDir:
    def __init__(self, path: Path):
        self.path = path

    def result(self, name):
        return {"rows_train": 3, "fingerprint": "f" * 64}

    def stage_dir(self, name):
        (self.path / name).mkdir(parents=True, exist_ok=True)
        return self.path / name


def test_not_enough_disk_fails_before_loading(recipe, tmp_path, tiny_model, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "base", safe_serialization=True)
    monkeypatch.setattr(train.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    monkeypatch.setattr(train, "load_model", lambda *a: pytest.fail("no model may be loaded"))
    with pytest.raises(StageError, match="not enough disk for checkpoints.*train.save_total_limit"):
        train.run(recipe({"name": "full"}), FakeRunDir(tmp_path / "run"))


def test_unreachable_hub_base_names_hf_endpoint_and_local_paths(recipe, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    recipe()  # writes the data file the recipe names
    hub_base = resolve({"name": "train-test", "base": {"model": "google/gemma-3-270m"}, "method": {"name": "lora"},
                        "data": {"files": ["data/chat.jsonl"], "format": "messages"}}, root=tmp_path)
    with pytest.raises(StageError, match="cannot be fetched from http://127.0.0.1:9.*HF_ENDPOINT.*local checkpoint folder"):
        models.resolve_base(hub_base)


def test_missing_data_stage_output(recipe, tmp_path):
    class Empty(FakeRunDir):
        def result(self, name):
            return {}

    with pytest.raises(StageError, match="--stages data,train"):
        train.run(recipe(), Empty(tmp_path))
