"""Models for the stages: the recipe's base as a local checkpoint, recipe sections -> quantization/PEFT configs,
loading, the tokenizer.model a GGUF conversion needs, and parameter counts. The floor below train, merge,
evaluate and gguf (like alignment-handbook's model_utils): a stage that needs a model helper finds it here.

    from hubforge.models import resolve_base, peft_config, bnb_config
    base_dir = resolve_base(recipe)                 # StageError when it cannot be fetched or found
    config = peft_config(recipe, base_dir)          # LoraConfig / PromptTuningConfig / PromptEncoderConfig / None

The translators are pure and unit-tested (tests/test_train.py); torch/transformers/peft are imported on use.
"""
from __future__ import annotations

import importlib
import json
import shutil
import struct
from pathlib import Path

from hubforge.errors import StageError


def resolve_base(recipe) -> Path:
    """The local checkpoint folder of `recipe.base` (hubforge.base), with errors a user can act on."""
    from hubforge.base import resolve_base as resolve

    try:
        return Path(resolve(recipe))
    except (OSError, ValueError) as exc:  # offline Hub (ConnectionError), missing local folder
        raise StageError(str(exc) if "base.model" in str(exc) else f"base.model {recipe.base.model!r}: {exc}") from None


# ---------------------------------------------------------------- recipe -> library objects (pure)
def lora_config(method):
    from peft import LoraConfig

    lora = method.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                      bias=lora.bias, use_rslora=lora.use_rslora, modules_to_save=list(lora.modules_to_save) or None,
                      task_type="CAUSAL_LM")


def bnb_config(method, quant_storage: str | None = None):
    """4-bit quantization for qlora (None for every other method). `quant_storage` (a torch dtype name) is the
    dtype the packed 4-bit weights are stored in: FSDP needs it equal to the compute dtype (hubforge.compute);
    otherwise bitsandbytes' uint8. Only the storage changes, not the quantized values."""
    if method.name != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    q = method.quantization
    storage = {"bnb_4bit_quant_storage": getattr(torch, quant_storage)} if quant_storage else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype), **storage)


def peft_config(recipe, base_dir: Path | None = None):
    """The PEFT config of the recipe's method (None for full fine-tuning)."""
    from peft import PromptEncoderConfig, PromptTuningConfig

    m = recipe.method
    if m.name in ("lora", "qlora"):
        return lora_config(m)
    if m.name == "prompt_tuning":
        pt = m.prompt_tuning
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": pt.init_text,
                "tokenizer_name_or_path": str(base_dir)} if pt.init_text else {"prompt_tuning_init": "RANDOM"}
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=pt.num_virtual_tokens, **init)
    if m.name == "p_tuning":
        p = m.p_tuning
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                   encoder_hidden_size=p.encoder_hidden_size, encoder_reparameterization_type=p.encoder_type)
    return None


def check_bitsandbytes() -> None:
    """QLoRA needs a working bitsandbytes: import it and quantize a tiny tensor, before loading anything big."""
    try:
        import torch

        bnb = importlib.import_module("bitsandbytes")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bnb.functional.quantize_4bit(torch.randn(64, 64, device=device, dtype=torch.float32), quant_type="nf4")
    except Exception as exc:
        raise StageError(f"method qlora needs a working bitsandbytes (4-bit NF4): {type(exc).__name__}: {exc}. "
                         "Install bitsandbytes==0.50.2, or use method.name: lora") from None


# ---------------------------------------------------------------- loading
def load(folder: Path, dtype):
    """A causal LM checkpoint in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def load_quantized(recipe, base_dir: Path):
    """The base as QLoRA trains on it: 4-bit NF4 weights (recipe.method.quantization), compute in base.dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, recipe.base.dtype),
                                                quantization_config=bnb_config(recipe.method))


def copy_tokenizer_model(base_dir: Path, folder: Path) -> None:
    """Put the base's SentencePiece tokenizer.model beside a saved tokenizer: llama.cpp's converter reads it."""
    if (Path(base_dir) / "tokenizer.model").is_file() and not (Path(folder) / "tokenizer.model").is_file():
        shutil.copy2(Path(base_dir) / "tokenizer.model", Path(folder) / "tokenizer.model")


def count_params(model_dir: Path) -> int:
    """Parameters in a checkpoint's safetensors files, from their headers (no tensor is read)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total
