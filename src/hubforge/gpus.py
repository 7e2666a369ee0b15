"""Named GPU classes, and how long a recipe's training would take on each: a FLOPs model, not a measurement.

    hubforge plan recipes/gemma-3-12b-it/turkish-alpaca-qlora.yaml     # the "Train time (est.)" row

plan.py gives `train_time` the base's dimensions, the parameter counts, the tokens to train and the memory estimate;
this module turns them into FLOPs per token and seconds per GPU class. Pure functions, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    tflops: dict  # train.precision -> dense peak TFLOPS; a precision the GPU lacks has no entry
    bandwidth_gbs: float  # memory bandwidth, for the 4-bit weights QLoRA dequantizes on every pass


# Dense (no 2:4 sparsity) peaks from the vendor datasheets: fp16/bf16 on tensor cores; fp32 without them, since
# PyTorch leaves TF32 matmuls off by default and the Trainer does not turn them on.
#   T4 datasheet: 65 TFLOPS fp16 mixed precision, 8.1 fp32, 320 GB/s; Turing has no bf16.
#   L4 datasheet: 242 TFLOPS bf16/fp16 *with sparsity* (121 dense), 30.3 fp32, 300 GB/s.
#   A10G (AWS g5) has no public NVIDIA datasheet; 70 TFLOPS bf16/fp16, 35 fp32, 600 GB/s as compared with the A10's
#     125 in Baseten's "NVIDIA A10 vs A10G for ML model inference".
#   A100 datasheet: 312 TFLOPS bf16/fp16, 19.5 fp32; 1,555 GB/s (40 GB), 2,039 GB/s (80 GB SXM).
#   H100 SXM datasheet: 1,979 TFLOPS bf16/fp16 with sparsity (989 dense), 67 fp32, 3.35 TB/s.
# Memory is the nominal size; the driver reports a little less (a T4 shows about 15 GiB).
GPUS = (
    GPU("T4 16 GB", 16, {"fp16": 65, "fp32": 8.1}, 320),
    GPU("L4 24 GB", 24, {"bf16": 121, "fp16": 121, "fp32": 30.3}, 300),
    GPU("A10G 24 GB", 24, {"bf16": 70, "fp16": 70, "fp32": 35}, 600),
    GPU("A100 40 GB", 40, {"bf16": 312, "fp16": 312, "fp32": 19.5}, 1555),
    GPU("A100 80 GB", 80, {"bf16": 312, "fp16": 312, "fp32": 19.5}, 2039),
    GPU("H100 SXM 80 GB", 80, {"bf16": 989, "fp16": 989, "fp32": 67}, 3350),
)

# Model-FLOPs utilisation: the share of the peak that the FLOPs counted below get in a Hugging Face Trainer run.
# 30 % is what two published single-GPU QLoRA runs work out to under this module's FLOPs count:
#   Philipp Schmid, "How to fine-tune open LLMs in 2025 with Hugging Face": Llama 3.1 8B QLoRA on 1x L4, packed
#     1024-token sequences, batch 4 x accumulation 4, 338 steps (5.5M tokens) in ~135 min = 684 tokens/s
#     x ~50 GFLOP/token (embeddings and LM head trained too) = 34 TFLOPS = 28 % of 121.
#   LLaMA-Factory wiki "Performance comparison": LLaMA-2 7B QLoRA (4-bit, HF), A100 40 GB, batch 4, 1024 tokens:
#     2,415 tokens/s x ~41 GFLOP/token = 100 TFLOPS = 32 % of 312.
# Large dense training reaches 40-50 %; fine-tuning loses to short sequences, padding, the LoRA adapters' small
# matmuls and the optimizer step, so the lower figure is the honest one. Treat the result as +-50 %.
MFU = 0.30

# bitsandbytes dequantizes each 4-bit weight to 16 bits before every matmul (forward, recompute, backward): read
# ~0.52 bytes of NF4 + constants, write 2 bytes, and the matmul reads the 2 bytes back.
DEQUANT_BYTES_PER_PARAM = 4.5


def flops_per_token(a: dict, params: dict, method_name: str, max_length: int, checkpointing: bool,
                    adapter: bool) -> dict:
    """Training FLOPs per token, by part. Forward: 2 per weight (multiply + add) plus attention over the context
    (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1: 2·layers·ctx·d_attn; ctx is
    train.max_length, an upper bound for unpacked rows, and Gemma's sliding-window layers see less).

    Backward: the gradient with respect to the activations costs one forward again, through frozen weights too; the
    gradient of the weights costs 2 per *trainable* weight. So a full fine-tune is 6·N (2 + 2 + 2), an adapter
    method (LoRA, QLoRA, prompt/p-tuning) about 4·N (its few weights add next to nothing), and gradient
    checkpointing adds one more forward (8·N, 6·N). TRL's chunked LM head also recomputes the logits in backward
    (2·vocab·hidden). QLoRA's dequantization is memory traffic, not FLOPs: `dequant_seconds` counts it."""
    total, trainable = params["total"], params["trainable"]
    attention = 2 * a["layers"] * max_length * a["heads"] * a["head_dim"]
    forward = 2 * (total + (trainable if adapter else 0)) + attention
    parts = {"forward": forward, "backward": forward + 2 * trainable,
             "recompute": forward if checkpointing else 0, "lm_head_recompute": 2 * a["vocab"] * a["hidden"]}
    return {"total": sum(parts.values()), "parts": parts, "quantized": method_name == "qlora"}


def dequant_seconds(params: dict, gpu: GPU, checkpointing: bool) -> float:
    """Seconds per micro-batch a QLoRA run spends dequantizing its 4-bit weights, once per pass, at full bandwidth."""
    passes = 3 if checkpointing else 2
    return passes * params["total"] * DEQUANT_BYTES_PER_PARAM / (gpu.bandwidth_gbs * 1e9)


def on_gpu(gpu: GPU, *, precision: str, need_gib: float, tokens: float, micro_batch_tokens: int, processes: int,
           flops: dict, params: dict, checkpointing: bool) -> dict:
    """Seconds to train `tokens` on `processes` GPUs of this class, or why it cannot."""
    if precision not in gpu.tflops:
        return {"fits": None, "why": f"no {precision} on this GPU (train.precision fp16 would run)"}
    if need_gib > gpu.memory_gib:
        return {"fits": False, "why": "does not fit"}
    per_gpu = tokens / processes
    seconds = per_gpu * flops["total"] / (gpu.tflops[precision] * 1e12 * MFU)
    if flops["quantized"]:
        seconds += per_gpu / micro_batch_tokens * dequant_seconds(params, gpu, checkpointing)
    return {"fits": True, "seconds": round(seconds, 1)}


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
