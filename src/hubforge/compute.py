"""Past one process: the recipe's `compute` section -> an accelerate config and the `accelerate launch` command
that runs the train stage's own entry point once per process (one per GPU; on a CPU machine, gloo processes).

    compute: {processes: 2, strategy: fsdp}     # in a recipe; the default is one process (no launch at all)

The train stage writes `accelerate_config(...)` to `train/accelerate.yaml` and runs `launch_argv(...)`; every rank
trains, rank 0 alone writes checkpoints, the log and the result, and the pipeline process (which launched them)
alone writes the manifest and runs the later stages. The functions here are pure except `check_config` (parses a
saved config with accelerate's own launcher code) and `die_with_parent` (Linux prctl).

Strategies: `ddp` replicates the model on every GPU; `fsdp` shards weights, gradients and optimizer state (for
QLoRA the 4-bit weights are stored in the compute dtype, `bnb_4bit_quant_storage`, so FSDP can flatten and shard
them with the 16-bit ones); `deepspeed_zero2` shards gradients and optimizer state; `deepspeed_zero3` everything.
DeepSpeed is not a dependency: its config is generated and checked, but launching needs `pip install deepspeed`.
Both sharding strategies need GPUs: accelerate applies them to GPU processes only, so on CPU only `ddp` launches.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

from hubforge.errors import StageError

STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
# What each strategy divides by the number of processes: (weights, trainable state). Activations never are.
SHARDING = {"single": (False, False), "ddp": (False, False), "fsdp": (True, True),
            "deepspeed_zero2": (False, True), "deepspeed_zero3": (True, True)}


def processes(recipe) -> int:
    return recipe.compute.processes


def launches(recipe) -> bool:
    """More than one process: the train stage runs under `accelerate launch` instead of in the pipeline's process."""
    return recipe.compute.processes > 1


def quant_storage(recipe) -> str | None:
    """QLoRA under FSDP: store the packed 4-bit weights in the compute dtype (FSDP shards one dtype per flat
    parameter; bitsandbytes' default uint8 storage would be neither sharded nor trainable alongside)."""
    if recipe.method.name == "qlora" and launches(recipe) and recipe.compute.strategy == "fsdp":
        return recipe.method.quantization.compute_dtype
    return None


def accelerate_config(recipe, cpu: bool) -> dict:
    """The accelerate config (as `accelerate config` would write it) for the recipe's compute section.

    Mixed precision stays 'no' here: the Trainer sets it from train.precision (its bf16/fp16 flags win).
    On a machine without CUDA the processes use gloo on CPU (`use_cpu`); the launcher is torchrun either way."""
    c, t = recipe.compute, recipe.train
    config = {"compute_environment": "LOCAL_MACHINE", "debug": False, "num_machines": 1, "machine_rank": 0,
              "num_processes": c.processes, "gpu_ids": "all", "mixed_precision": "no", "use_cpu": cpu,
              "rdzv_backend": "static", "same_network": True, "main_training_function": "main"}
    if c.strategy == "ddp":
        config["distributed_type"] = "MULTI_GPU"
    elif c.strategy == "fsdp":
        qlora = recipe.method.name == "qlora"
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 1, "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_backward_prefetch": "BACKWARD_PRE", "fsdp_forward_prefetch": False,
            # each rank saves and reloads its own shard: no rank has to hold the whole model to checkpoint
            "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_offload_params": False,
            # frozen 4-bit and trainable LoRA weights in one flat parameter need the original-parameter view off
            "fsdp_use_orig_params": not qlora,
            "fsdp_cpu_ram_efficient_loading": True, "fsdp_sync_module_states": True,
            "fsdp_activation_checkpointing": False,  # the Trainer's gradient_checkpointing does it (train section)
        }
    else:
        stage = int(c.strategy[-1])
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": stage, "gradient_accumulation_steps": t.grad_accum, "gradient_clipping": t.max_grad_norm,
            "offload_optimizer_device": "none", "offload_param_device": "none",
            "zero3_init_flag": stage == 3, "zero3_save_16bit_model": stage == 3, "deepspeed_multinode_launcher": "standard",
        }
    return config


def check_launchable(recipe, cuda: bool) -> None:
    """Refuse before any model is loaded what cannot start here, or would start as something else."""
    strategy = recipe.compute.strategy
    if not launches(recipe) or strategy == "ddp":
        return
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise StageError(f"compute.strategy {strategy} needs DeepSpeed, which is not installed: "
                         "pip install deepspeed (on the GPU machine, matching its CUDA), or use compute.strategy: fsdp; "
                         "the accelerate config is written to train/accelerate.yaml either way")
    storage = quant_storage(recipe)
    if storage and recipe.base.dtype != storage:
        raise StageError(f"qlora under fsdp stores the 4-bit weights as method.quantization.compute_dtype ({storage}); "
                         f"FSDP shards one dtype, so base.dtype must be {storage} too, not {recipe.base.dtype}")
    if not cuda:  # accelerate (1.15, state.py) applies FSDP/DeepSpeed to GPU processes only; CPU ranks get plain DDP
        raise StageError(f"compute.strategy {strategy} needs GPUs and this machine has none: accelerate would quietly "
                         "train plain data-parallel CPU processes instead. Use compute.strategy: ddp here.")


def launch_argv(config_path: Path, module: str, args: list[str]) -> list[str]:
    """`accelerate launch` of `python -m module args` with the saved config; a free rendezvous port each time."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
            "--main_process_port", "0", "-m", module, *args]


def launch_env(cpu: bool) -> dict:
    env = dict(os.environ)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"  # the Trainer then asks accelerate for gloo CPU processes
    return env


def rank() -> int:
    """This process's global rank under torchrun (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def device_map(quantized: bool, on_gpu: bool, strategy: str | None) -> dict | None:
    """Where a 4-bit model is loaded: this rank's own GPU (bitsandbytes needs it placed); FSDP places it itself."""
    if not (quantized and on_gpu) or strategy == "fsdp":
        return None
    import torch

    return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}


def check_config(path: Path) -> dict:
    """Parse a saved accelerate config with accelerate's own code (what `accelerate launch --config_file` does
    before it starts anything); returns the launcher's arguments. Raises ValueError naming what is wrong."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    load_config_from_file(str(path))  # unknown keys and bad enum values fail here
    args, *_ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    if args.use_fsdp:
        import torch
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        env = prepare_multi_gpu_env(args)  # the FSDP_* variables the ranks would get
        saved = dict(os.environ)
        try:
            os.environ.update({k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))})
            if not torch.cuda.is_available():  # the one check that needs a device: where rank 0's weights are synced to
                os.environ.update(FSDP_SYNC_MODULE_STATES="false", FSDP_CPU_RAM_EFFICIENT_LOADING="false")
            FullyShardedDataParallelPlugin()  # reads and checks them, as each rank's Accelerator would
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return vars(args)


def accelerate_version() -> str:
    from importlib.metadata import version

    return version("accelerate")


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, so a `kill -9` of the run leaves no rank training on.

    torchrun starts each rank in a session of its own; without this a killed launcher would orphan them."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)
