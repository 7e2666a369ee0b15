"""Data + train stages for real on the tiny random Gemma 3 (integration tier): every method, the loss mask,
falling loss on the shipped Persian data, and a run killed with SIGKILL that resumes from its checkpoint.

    .venv/bin/python -m pytest tests/test_train_integration.py -q -p no:cacheprovider -m "integration or slow"
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubforge import chat, pipeline
from hubforge.recipe import resolve
from hubforge.rundir import RunDir
from hubforge.stages import train

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def run_stages(recipe, path: Path) -> dict:
    run_dir = RunDir.open(path)
    pipeline.run(recipe, run_dir, stages=["data", "train"], echo=lambda _: None)
    return RunDir.open(path).manifest["stages"]


def log_of(run: Path) -> list[dict]:
    return train.read_jsonl(run / "train" / "log.jsonl")


@pytest.mark.parametrize("method", [
    {"name": "lora"},
    {"name": "qlora", "quantization": {"compute_dtype": "float32"}},
    {"name": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 4, "init_text": "پاسخ کوتاه بده:"}},
    {"name": "p_tuning", "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 32}},
    {"name": "full", "full": {"trainable_modules": ["embed_tokens"]}},
], ids=lambda m: m["name"])
def test_each_method_trains_a_few_steps(make_recipe, tmp_path, method):
    recipe = make_recipe(method=method, train={"max_steps": 3, "batch_size": 2, "save_steps": 2, "learning_rate": 1e-3})
    stages = run_stages(recipe, tmp_path / "run")
    result = stages["train"]["result"]
    assert stages["data"]["status"] == stages["train"]["status"] == "done"
    assert result["steps"] == 3 and result["tokens_seen"] > 0 and result["peak_rss_mb"] > 0
    assert result["checks"]["bos_once"] and result["resumed_from"] is None
    assert [r["step"] for r in log_of(tmp_path / "run")] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["learning_rate"] is not None and r["tokens"] > 0 for r in log_of(tmp_path / "run"))
    out = tmp_path / "run"
    assert (out / "train" / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert {"tokenizer.model", "chat_template.jinja", "tokenizer_config.json"} <= {p.name for p in (out / "train" / "tokenizer").iterdir()}
    if method["name"] == "full":
        assert result["model_dir"] == "train/model" and (out / "train/model/model.safetensors").is_file()
        config = json.loads((recipe.local_path("./base") / "config.json").read_text("utf-8"))
        assert result["trainable_params"] == config["vocab_size"] * config["hidden_size"]  # the (tied) embedding only
    else:
        assert result["adapter_dir"] == "train/adapter" and (out / "train/adapter/adapter_model.safetensors").is_file()
        assert 0 < result["trainable_params"] < result["total_params"] / 10
    assert result["padding_free"] == (method["name"] not in ("prompt_tuning", "p_tuning"))


def test_lora_adapter_loads_back_and_changes_the_model(make_recipe, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(train={"max_steps": 3, "learning_rate": 5e-3})
    run_stages(recipe, tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(recipe.local_path("./base"))
    ids = torch.tensor([[2, 10, 20, 30]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, tmp_path / "run/train/adapter")
    assert not torch.allclose(before, tuned(ids).logits)
    assert sum(1 for n, _ in tuned.named_modules() if n.endswith("q_proj.lora_A")) == 2  # one LoRA per layer, no stacking


def trainer_for(recipe, rows: list[dict], tmp_path: Path):
    """The SFTTrainer the train stage builds, to inspect its tokenized examples."""
    from datasets import Dataset
    from trl import SFTTrainer

    base_dir = recipe.local_path("./base")
    tokenizer, template = chat.load_tokenizer(base_dir)
    return tokenizer, SFTTrainer(model=train.load_model(recipe, base_dir), args=train.sft_config(recipe, tmp_path / "ckpt"),
                                 processing_class=tokenizer, peft_config=train.peft_config(recipe, base_dir),
                                 train_dataset=Dataset.from_list([chat.for_template(r, template) for r in rows]))


CONVERSATION = {"messages": [{"role": "system", "content": "کوتاه پاسخ بده."}, {"role": "user", "content": "سلام"},
                             {"role": "assistant", "content": "سلام! خوبم."}, {"role": "user", "content": "پایتخت ایران؟"},
                             {"role": "assistant", "content": "تهران."}]}


@pytest.mark.parametrize("packing", [False, True])
def test_only_assistant_replies_and_end_of_turn_carry_loss(make_recipe, tmp_path, packing):
    recipe = make_recipe(train={"packing": packing, "max_length": 128})
    other = {"messages": [{"role": "user", "content": "یک"}, {"role": "assistant", "content": "دو"}]}
    tokenizer, trainer = trainer_for(recipe, [CONVERSATION, other], tmp_path)
    example = trainer.train_dataset[0]
    ids, labels = example["input_ids"], example["labels"]
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    # bfd packing puts the longer conversation first, then the short one in the same row
    assert trained == "سلام! خوبم.<end_of_turn>\nتهران.<end_of_turn>\n" + ("دو<end_of_turn>\n" if packing else "")
    assert all(label == -100 or label == i for i, label in zip(ids, labels))
    # BOS exactly once per sequence (a packed row holds several)
    lengths = example.get("seq_lengths") or [len(ids)]
    assert ids.count(tokenizer.bos_token_id) == len(lengths)
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert all(ids[s] == tokenizer.bos_token_id for s in starts)
    assert train.check_prepared(trainer.train_dataset, tokenizer.bos_token_id, True)["bos_once"]


def test_scoring_only_loss_positions_gives_the_same_loss_and_gradients(tiny_base):
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    trl_utils.add_fused_lm_head(model)
    torch.manual_seed(0)
    ids = torch.randint(4, 1000, (1, 48))
    labels = ids.clone()
    labels[0, :30] = -100  # a prompt: no loss there

    def loss_and_grad():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out.loss.detach(), model.model.layers[0].mlp.down_proj.weight.grad.clone()

    patched = trl_utils._use_triton
    trl_utils._use_triton = getattr(patched, "trl_original", patched)  # TRL as shipped: every position scored on CPU
    try:
        shipped = loss_and_grad()
        train.score_only_loss_positions()
        assert trl_utils._use_triton(torch.device("cpu"))
        compact = loss_and_grad()
    finally:
        trl_utils._use_triton = patched
    assert torch.allclose(shipped[0], compact[0], atol=1e-6) and torch.allclose(shipped[1], compact[1], atol=1e-6)


def test_plain_text_gets_one_bos_from_the_tokenizer(make_recipe, tmp_path, persian_chat_file):
    texts = [m["content"] for line in persian_chat_file.read_text("utf-8").splitlines()[:40]
             for m in json.loads(line)["messages"]]
    (make_recipe().root / "data" / "text.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), "utf-8")
    recipe = make_recipe(data={"files": ["data/text.jsonl"], "format": "text"}, train={"max_steps": 2})
    result = run_stages(recipe, tmp_path / "run")["train"]["result"]
    assert result["checks"]["bos_once"] and result["assistant_only_loss"] is False


def test_loss_falls_over_20_steps_on_the_persian_data(make_recipe, tmp_path):
    recipe = make_recipe(train={"max_steps": 20, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 100})
    losses = [r["loss"] for r in log_of_run(recipe, tmp_path / "run")]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, losses


def log_of_run(recipe, path):
    run_stages(recipe, path)
    return log_of(path)


DRIVER = """
import json, sys, time
from pathlib import Path
from hubforge import pipeline
from hubforge.recipe import resolve
from hubforge.rundir import RunDir
from hubforge.stages import train

raw, root, run, pause = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
logged = train.JsonlLog.on_log
def slow_log(self, *a, **k):  # slow each step down so the test can kill it mid-training
    logged(self, *a, **k)
    time.sleep(pause)
train.JsonlLog.on_log = slow_log
pipeline.run(resolve(raw, root=root, source="<kill-test>"), RunDir.open(run), stages=["data", "train"])
"""


def test_sigkill_mid_training_resumes_with_the_same_steps_and_data_order(make_recipe, tmp_path):
    from safetensors.torch import load_file

    root = make_recipe().root
    raw = {"name": "kill-test", "base": {"model": "./base"}, "data": {"files": ["data/chat.jsonl"], "format": "messages"},
           "method": {"name": "lora"}, "train": {"max_steps": 16, "batch_size": 4, "save_steps": 4, "learning_rate": 1e-3}}
    (tmp_path / "driver.py").write_text(DRIVER, "utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), json.dumps(raw), str(root), str(run), "0.2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ((run / "train/checkpoints/checkpoint-8/trainer_state.json").is_file() and len(log_of_safe(run)) >= 10):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.03)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert RunDir.open(run).stage("train")["status"] == "interrupted"
    killed_at = len(log_of(run))
    assert 10 <= killed_at < 16  # killed mid-training

    recipe = resolve(raw, root=root, source="<kill-test>")
    resumed = run_stages(recipe, run)["train"]["result"]
    reference = run_stages(recipe, tmp_path / "uninterrupted")["train"]["result"]
    assert resumed["resumed_from"].startswith("train/checkpoints/checkpoint-") and resumed["steps"] == 16
    assert int(resumed["resumed_from"].rsplit("-", 1)[1]) >= 8
    a, b = log_of(run), log_of(tmp_path / "uninterrupted")
    assert [r["step"] for r in a] == list(range(1, 17))  # nothing lost, nothing logged twice
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]  # the same batches in the same order
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4, abs=1e-5)
    assert resumed["tokens_seen"] == reference["tokens_seen"]
    wa, wb = load_file(run / "train/adapter/adapter_model.safetensors"), load_file(tmp_path / "uninterrupted/train/adapter/adapter_model.safetensors")
    assert sorted(wa) == sorted(wb)  # the same single adapter, not one stacked on another
    assert all(float((wa[k].float() - wb[k].float()).abs().max()) < 1e-5 for k in wa)


def log_of_safe(run: Path) -> list:
    try:
        return [line for line in (run / "train" / "log.jsonl").read_text("utf-8").splitlines() if line.strip()]
    except OSError:
        return []


@pytest.mark.slow
def test_lora_on_the_embedded_base(make_recipe, tmp_path):
    recipe = make_recipe(base={"model": "embedded:gemma-3-270m"},
                         train={"max_steps": 2, "batch_size": 2, "max_length": 64, "learning_rate": 1e-4})
    result = run_stages(recipe, tmp_path / "run")["train"]["result"]
    assert result["steps"] == 2 and result["checks"]["bos_once"] and result["total_params"] > 260_000_000
    assert result["chat_template"]["family"] == "gemma3"
