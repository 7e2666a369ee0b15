"""Train stage: TRL's SFTTrainer + PEFT on `data/train.jsonl`, for every method in the recipes, resumable.

    hubforge run recipes/gemma-3-270m/persian-chat-lora.yaml --stages data,train

Outputs in `train/`: `adapter/` (lora, qlora, prompt_tuning, p_tuning) or `model/` (full), `tokenizer/` (with the
chat template used), `checkpoints/` (every train.save_steps, with optimizer and RNG state) and `log.jsonl` (one line
per logged step). A run killed at any point continues from its last complete checkpoint when re-run: the adapter
is rebuilt fresh from the base and the checkpoint's weights are loaded into it (no adapter stacked on an adapter),
and the seeded sampler skips the batches already trained, so the data order is the one of an uninterrupted run.

Memory: SFTTrainer (TRL 1.16) computes the loss through a fused, chunked LM head that never materialises the
(batch, seq, vocab) logits; with Gemma's 262k vocabulary those would be the largest tensor. Here it projects only
the positions that carry loss, on CPU as on CUDA (`score_only_loss_positions`). Padding-free batches (or packing)
keep padding out of the FLOPs and the memory. benchmarks/train_throughput.py measures each of these choices.

More than one process (recipe `compute.processes`): this stage writes `train/accelerate.yaml` (hubforge.compute)
and runs `accelerate launch -m hubforge.stages.train RUN_DIR ...`, this module's `main`, once per rank. The
pipeline's process has already chosen the resume point; rank 0 alone writes checkpoints (the Trainer's), the log,
the adapter and `train/result.json`, which this stage returns; the other ranks only train. Every rank dies with
its launcher, and the launcher with this process, so a `kill -9` of the run leaves nothing training on.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from hubforge import chat, compute, products
from hubforge.errors import StageError
from hubforge.models import bnb_config, check_bitsandbytes, copy_tokenizer_model, count_params, peft_config, resolve_base
from hubforge.scoring import read_jsonl


# The recipe sections this stage reads (part of its cache key; tests/test_layers.py checks it reads no other).
SECTIONS = ('base', 'data', 'method', 'train', 'compute')


def run(recipe, run_dir) -> dict:
    data = run_dir.result("data")
    if not data.get("rows_train"):
        raise StageError("the train stage needs the data stage's output; run with --stages data,train")
    out = run_dir.stage_dir("train")
    ckpt_dir, m, t = out / "checkpoints", recipe.method, recipe.train

    # ---- checks that fail fast, before any model is loaded
    if m.name == "qlora":
        check_bitsandbytes()
    base_dir = resolve_base(recipe)
    total_params = count_params(base_dir)
    steps = t.max_steps or estimated_steps(recipe, data["rows_train"])
    need = disk_needed(recipe, total_params, steps)
    free = shutil.disk_usage(out).free
    if need > free:
        raise StageError(f"not enough disk for checkpoints in {out}: about {need / 2**30:.1f} GiB needed "
                         f"({total_params / 1e6:.0f}M base parameters, method {m.name}, "
                         f"{products.checkpoints_kept(recipe, steps)} checkpoint(s) kept of train.save_total_limit="
                         f"{t.save_total_limit}), {free / 2**30:.1f} GiB free. Free space or lower train.save_total_limit.")

    if compute.launches(recipe):
        import torch

        config_path = write_accelerate_config(recipe, out)
        compute.check_launchable(recipe, cuda=torch.cuda.is_available())

    # ---- resume point: only checkpoints written for these same inputs count (chosen here, before any rank starts)
    key = hashlib.sha256((recipe.section_hash("base", "method", "train", "compute") + data["fingerprint"]).encode()).hexdigest()
    resume = resume_point(ckpt_dir, key)
    if compute.launches(recipe):
        return launch(recipe, run_dir, out, config_path, resume)
    return train_here(recipe, run_dir, base_dir, resume)


def write_accelerate_config(recipe, out: Path) -> Path:
    """train/accelerate.yaml for this machine (gloo on CPU when it has no CUDA), checked by accelerate's own parser."""
    import torch
    import yaml

    path = out / "accelerate.yaml"
    path.write_text(yaml.safe_dump(compute.accelerate_config(recipe, cpu=not torch.cuda.is_available()), sort_keys=False), "utf-8")
    try:
        compute.check_config(path)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise StageError(f"{path}: accelerate {compute.accelerate_version()} refuses the generated config for "
                         f"compute.strategy {recipe.compute.strategy}: {exc}") from None
    return path


def launch(recipe, run_dir, out: Path, config_path: Path, resume: Path | None) -> dict:
    """Train under `accelerate launch`, one process per rank, each running `main` below; returns rank 0's result."""
    import torch

    cpu = not torch.cuda.is_available()
    (out / "result.json").unlink(missing_ok=True)
    argv = compute.launch_argv(config_path, "hubforge.stages.train", [
        str(run_dir.path), "--root", str(recipe.root), "--sha256", recipe.sha256, *(["--resume", str(resume)] if resume else [])])
    n, strategy = recipe.compute.processes, recipe.compute.strategy
    print(f"[train] {n} processes ({strategy}{', gloo on CPU' if cpu else ''}): {config_path}")
    code = subprocess.run(argv, env=compute.launch_env(cpu), preexec_fn=compute.die_with_parent).returncode
    if code != 0 or not (out / "result.json").is_file():
        raise StageError(f"accelerate launch of {n} training processes ({strategy}) exited with {code}; the ranks' "
                         "errors are printed above. Running the same command again resumes from the last checkpoint.")
    return json.loads((out / "result.json").read_text("utf-8"))


def main(argv: list[str] | None = None) -> None:
    """One rank of a launched run: `python -m hubforge.stages.train RUN_DIR --root R --sha256 S --resume CKPT`."""
    from hubforge.recipe import read_resolved
    from hubforge.rundir import RunDir

    compute.die_with_parent()
    parser = argparse.ArgumentParser(prog="hubforge.stages.train")
    for name in ("run_dir", "--root", "--sha256", "--resume"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    run_dir = RunDir.open(Path(args.run_dir))
    recipe = dataclasses.replace(read_resolved(run_dir.path / "recipe.resolved.yaml"), root=Path(args.root))
    if recipe.sha256 != args.sha256:
        raise SystemExit(f"{run_dir.path}/recipe.resolved.yaml is not the recipe this run was launched for")
    result = train_here(recipe, run_dir, resolve_base(recipe), Path(args.resume) if args.resume else None)
    if result is not None:  # rank 0
        (run_dir.path / "train" / "result.json").write_text(json.dumps(result), "utf-8")


def train_here(recipe, run_dir, base_dir: Path, resume: Path | None) -> dict | None:
    """Train in this process (the only one, or one rank of several); the result on rank 0, None on the others."""
    import torch
    from datasets import Dataset

    out, m, t = run_dir.stage_dir("train"), recipe.method, recipe.train
    main_rank = compute.rank() == 0
    tokenizer, template = chat.load_tokenizer(base_dir, recipe.base.chat_template, need_template=recipe.data.format != "text")
    if t.assistant_only_loss and (problem := chat.check_trainable(recipe.base.chat_template, template.text, template.family)):
        raise StageError(problem)
    rows = {split: [chat.for_template({k: v for k, v in r.items() if k != "qa"}, template)
                    for r in read_jsonl(run_dir.path / "data" / f"{split}.jsonl")] for split in ("train", "eval")}

    log = JsonlLog(out / "log.jsonl", upto_step=step_of(resume)) if main_rank else None  # rank 0 writes the log

    # ---- model, adapter, trainer
    model = load_model(recipe, base_dir)
    if m.name == "full":
        freeze_except(model, m.full.trainable_modules)
    from trl import SFTTrainer

    score_only_loss_positions()
    cuda = torch.cuda.is_available()
    args = sft_config(recipe, out / "checkpoints", cuda=cuda, bf16_ok=torch.cuda.is_bf16_supported() if cuda else True)
    if args.assistant_only_loss and (variant := chat.training_template(template.text)):
        tokenizer.chat_template = variant  # one TRL cannot patch (e.g. llama3_1): hubforge's marked variant
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tokenizer, callbacks=[log] if log is not None else [],
        train_dataset=Dataset.from_list(rows["train"]),
        eval_dataset=Dataset.from_list(rows["eval"]) if t.eval_steps and rows["eval"] else None,
        peft_config=peft_config(recipe, base_dir),
    )
    tokenizer.chat_template = template.text  # rows are tokenized; the saved tokenizer keeps the plain template
    checks = check_prepared(trainer.train_dataset, tokenizer.bos_token_id, args.assistant_only_loss)
    trainable, total = trainable_params(trainer.model)
    if main_rank:
        print(f"[train] {m.name}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
              + (f"; resuming from {resume.name}" if resume else ""))

    # ---- train (the progress bar is the Trainer's own)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    session_seconds = time.time() - started

    # ---- save what the next stages read
    result_dir = out / ("adapter" if m.is_adapter else "model")
    # FSDP: every rank hands in its shard of the weights; the other strategies hold them whole on each rank
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if not main_rank:
        return None
    shutil.rmtree(result_dir, ignore_errors=True)
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(result_dir, state_dict=state_dict, safe_serialization=True)
    for folder in ([out / "tokenizer"] + ([result_dir] if not m.is_adapter else [])):
        tokenizer.save_pretrained(folder)
        copy_tokenizer_model(base_dir, folder)
    state, losses = trainer.state, [r["loss"] for r in read_jsonl(log.path)]
    return {
        "method": m.name, ("adapter_dir" if m.is_adapter else "model_dir"): rel(result_dir, run_dir),
        "tokenizer_dir": rel(out / "tokenizer", run_dir), "log": rel(log.path, run_dir),
        "steps": state.global_step, "epochs": round(state.epoch or 0, 4), "tokens_seen": int(state.num_input_tokens_seen),
        # mean of every logged step, the killed session's included (Trainer's training_loss covers one session)
        "train_loss": round(sum(losses) / len(losses), 6) if losses else round(output.training_loss, 6),
        "first_loss": losses[0] if losses else None, "final_loss": log.last_loss,
        "seconds": round(log.seconds_offset + session_seconds, 2), "session_seconds": round(session_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "trainable_params": trainable, "total_params": total, "hardware": hardware(cuda),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "packing": args.packing, "padding_free": args.padding_free, "assistant_only_loss": args.assistant_only_loss,
        "resumed_from": rel(resume, run_dir) if resume else None, "checks": checks,
        "chat_template": {**template.describe(), "training_variant": chat.training_support(template.text)
                          if args.assistant_only_loss and template.text else None},
        "loss_head": "TRL fused chunked LM head, loss positions only (no full logits)",
        "compute": {"processes": recipe.compute.processes,
                    "strategy": recipe.compute.strategy if compute.launches(recipe) else "single process"},
    }


# ---------------------------------------------------------------- recipe -> library objects (pure; models.py has the rest)
def precision_flags(precision: str, cuda: bool, bf16_ok: bool) -> dict:
    """Trainer's bf16/fp16 flags, set only where the hardware supports them (fp16 autocast needs a GPU)."""
    if precision == "bf16" and bf16_ok:
        return {"bf16": True, "fp16": False}
    if precision == "fp16" and cuda:
        return {"bf16": False, "fp16": True}
    if precision != "fp32":
        print(f"[train] train.precision {precision} is not supported on this {'GPU' if cuda else 'CPU'}; training in fp32")
    return {"bf16": False, "fp16": False}  # explicit: SFTConfig would default to bf16=True


def sft_config(recipe, output_dir: Path, cuda: bool = False, bf16_ok: bool = True):
    from trl import SFTConfig

    t = recipe.train
    prompt_learning = recipe.method.name in ("prompt_tuning", "p_tuning")
    # Virtual tokens are prepended per row, so a flattened (padding-free or packed) batch would share one prompt.
    packing, padding_free = t.packing and not prompt_learning, t.padding_free and not prompt_learning
    return SFTConfig(
        output_dir=str(output_dir), seed=t.seed, data_seed=t.seed,
        learning_rate=t.learning_rate, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, optim=t.optimizer, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        # The data stage already fitted every row to max_length; padding-free without packing must not re-truncate.
        max_length=t.max_length if packing or not padding_free else None,
        packing=packing, packing_strategy="bfd", padding_free=padding_free, assistant_only_loss=t.assistant_only_loss,
        activation_checkpointing=t.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps,
        logging_strategy="steps", logging_steps=t.logging_steps, report_to="none", disable_tqdm=False,
        include_num_input_tokens_seen="non_padding", dataloader_pin_memory=cuda,
        use_cpu=not cuda,  # else a bf16 recipe on CPU stops in TrainingArguments ("doesn't support bf16/gpu")
        **precision_flags(t.precision, cuda, bf16_ok),
    )


def freeze_except(model, modules: tuple[str, ...]) -> None:
    """Full fine-tune: every weight, or only parameters under the named modules (matched as dotted suffixes)."""
    if not modules:
        return
    # Tied weights (Gemma's lm_head is embed_tokens) appear once per alias here, so `lm_head` finds them too.
    chosen = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
              if any(f".{m}." in "." + name.rsplit(".", 1)[0] + "." for m in modules)}
    for param in model.parameters():
        param.requires_grad = id(param) in chosen
    if not chosen:
        raise StageError(f"method.full.trainable_modules {list(modules)} match no parameter; module names look like "
                         f"{', '.join(n for n, _ in list(model.named_modules())[1:6])}")


def estimated_steps(recipe, rows_train: int) -> int:
    """Optimizer steps of an epoch-bounded run, at most (packing only lowers it)."""
    t = recipe.train
    per_step = t.batch_size * t.grad_accum * recipe.compute.processes
    return math.ceil(t.epochs * -(-rows_train // per_step))  # a fractional last epoch still runs its step


def disk_needed(recipe, total_params: int, steps: int) -> int:
    """Bytes the checkpoints and the result need, with 10 % slack. The trainable count is an upper bound, since the
    model is not loaded yet: every weight for a full fine-tune or modules_to_save, 5 % for other adapters."""
    m = recipe.method
    trainable = total_params if not m.is_adapter or (m.lora and m.lora.modules_to_save) else total_params // 20
    shape = (m.is_adapter, total_params, trainable)
    kept = products.checkpoints_kept(recipe, steps)
    return int((products.checkpoint_bytes(*shape) * kept + products.train_result_bytes(*shape)) * 1.1)


def score_only_loss_positions() -> None:
    """Let TRL's fused LM head project only the positions that carry loss on CPU too, as it does on CUDA.

    TRL 1.16 compacts to those positions only where its Triton kernel runs (CUDA/XPU); elsewhere it scores every
    position so that a Neuron graph keeps one shape. A CPU compiles nothing, and with assistant-only loss most
    positions carry none: compacting gives the same loss and gradients with ~2.5x less LM-head work (measured:
    benchmarks/train_throughput.py, tests/test_train_integration.py). Applied only to the pinned TRL it was read from.
    """
    import trl
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    if hasattr(original, "trl_original"):
        return
    if trl.__version__ != "1.16.0":  # only reachable with HUBFORGE_ALLOW_VERSION_DRIFT=1: say what is lost
        print(f"[train] TRL {trl.__version__} is not the pinned 1.16.0: its LM head is used as shipped "
              "(on CPU it scores every position; slower, same loss)")
        return

    def compact_on_cpu(device) -> bool:
        return original(device) or device.type == "cpu"

    compact_on_cpu.trl_original = original
    trl_utils._use_triton = compact_on_cpu


def load_model(recipe, base_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    quant = bnb_config(recipe.method, quant_storage=compute.quant_storage(recipe))
    strategy = recipe.compute.strategy if compute.launches(recipe) else None
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=getattr(torch, recipe.base.dtype), quantization_config=quant,
        device_map=compute.device_map(quant is not None, torch.cuda.is_available(), strategy),
    )
    if quant is not None and strategy != "fsdp":  # FSDP flattens 4-bit and 16-bit weights together: one dtype, no fp32 norms
        from peft import prepare_model_for_kbit_training

        # fp32 norms/embeddings, input grads for checkpointing: the k-bit recipe of the QLoRA paper
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ---------------------------------------------------------------- resume + logging
def resume_point(ckpt_dir: Path, key: str) -> Path | None:
    """The latest complete checkpoint written for `key`; stale or half-written ones are removed."""
    marker = ckpt_dir / "hubforge-inputs.json"
    if ckpt_dir.exists() and (not marker.is_file() or json.loads(marker.read_text("utf-8")).get("key") != key):
        shutil.rmtree(ckpt_dir)  # written for other inputs: resuming them would train a different run
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key}), "utf-8")
    for folder in sorted(ckpt_dir.glob("checkpoint-*"), key=step_of, reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text("utf-8"))  # written last by the Trainer
            return folder
        except (OSError, ValueError):
            shutil.rmtree(folder)  # killed while saving
    return None


def step_of(path: Path | None) -> int:
    return int(path.name.rsplit("-", 1)[1]) if path else 0


class JsonlLog(TrainerCallback):
    """One JSON line per logged step: step, loss, learning_rate, grad_norm, tokens, seconds (cumulative)."""

    def __init__(self, path: Path, upto_step: int):
        self.path = path
        kept = [r for r in read_jsonl(path) if r["step"] <= upto_step] if path.is_file() and upto_step else []
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), "utf-8")  # steps after the checkpoint are redone
        self.seconds_offset = kept[-1]["seconds"] if kept else 0.0
        self.last_loss, self.started = None, time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.last_loss = logs["loss"]
        record = {"step": state.global_step, "loss": logs["loss"], "learning_rate": logs.get("learning_rate"),
                  "grad_norm": logs.get("grad_norm"), "tokens": int(state.num_input_tokens_seen),
                  "seconds": round(self.seconds_offset + time.time() - self.started, 3), "epoch": state.epoch}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- checks and facts
def check_prepared(dataset, bos_id: int | None, assistant_only: bool) -> dict:
    """BOS exactly once per sequence and a sane loss mask, on the tokenized examples SFTTrainer will train on."""
    example = dataset[0]
    ids, labels = example["input_ids"], example["labels"]
    lengths = example.get("seq_lengths") or [len(ids)]  # packed rows hold several sequences
    start = 0
    for n in lengths:
        if problem := chat.bos_problem(ids[start:start + n], bos_id):
            raise StageError(f"tokenized training example: {problem}")
        start += n
    trained = sum(1 for x in labels if x != -100)
    if trained == 0 or (assistant_only and trained == len(labels)):
        raise StageError(f"the loss mask of the first training example is wrong ({trained} of {len(labels)} tokens "
                         "carry loss); check train.assistant_only_loss and the chat template")
    return {"bos_once": True, "loss_tokens_first_example": trained, "tokens_first_example": len(ids)}


def trainable_params(model) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT: counts packed 4-bit weights at their real size
        return tuple(int(x) for x in model.get_nb_trainable_parameters())
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def hardware(cuda: bool) -> dict:
    import torch

    facts = {"device": "cuda" if cuda else "cpu", "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if cuda:
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def rel(path: Path, run_dir) -> str:
    return str(Path(path).relative_to(run_dir.path))



if __name__ == "__main__":
    main()
