"""GGUF export speed on the embedded Gemma 3 270M: conversion and quantization seconds and MB/s, and generation
tokens/s of every GGUF type vs the transformers float32 model, all measured in the same run.

    .venv/bin/python benchmarks/gguf_export.py                      # PYTHONPATH=src if hubforge is not installed
    .venv/bin/python benchmarks/gguf_export.py --tiny               # smoke test on a tiny random Gemma 3 (~1 min)

The checkpoint comes from hubforge.base.resolve_base (the shipped persian-chat-lora recipe's base); conversion
and quantization are the gguf stage's own calls (hubforge.llamacpp). Generation: the same chat-formatted prompt,
greedy, --tokens new tokens; tokens/s counts decoding only (after the first token) for both backends. For
transformers, decoding time is generate(N) - generate(1), each the best of --runs. Results are printed with
ratios and written to benchmarks/results/gguf_export.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see hubforge/llamacpp.py
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests" / "fixtures")]
MB = 2**20
PROMPT = "یک پاراگراف کوتاه درباره‌ی دریا بنویس."


def checkpoint(tiny: bool, work: Path) -> Path:
    if tiny:
        from tiny_model import build_tiny_gemma3

        model = build_tiny_gemma3(work / "tiny")
        config = json.loads((model / "config.json").read_text())
        config["query_pre_attn_scalar"] = config["head_dim"]  # as llama.cpp computes it (see tests/test_gguf.py)
        (model / "config.json").write_text(json.dumps(config))
        return model
    from hubforge.base import resolve_base
    from hubforge.recipe import load_recipe

    return resolve_base(load_recipe(REPO / "recipes" / "gemma-3-270m" / "persian-chat-lora.yaml"))


def hf_tokens_per_s(model_dir: Path, ids: list[int], tokens: int, runs: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def best(n: int) -> float:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            with torch.inference_mode():
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            times.append(time.perf_counter() - started)
        return min(times)

    return (tokens - 1) / (best(tokens) - best(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quants", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gguf_export.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from hubforge import llamacpp

    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        work = Path(tmp)
        model_dir = checkpoint(args.tiny, work)
        source_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / MB
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"])

        f16 = work / "model-F16.gguf"
        seconds = llamacpp.convert_model(llamacpp.converter_input(model_dir, work / "view"), f16, "F16")
        rows = [{"type": "F16", "seconds": seconds, "mb": f16.stat().st_size / MB, "input_mb": source_mb}]
        files = {"F16": f16}
        for qtype in args.quants.split(","):
            files[qtype] = work / f"model-{qtype}.gguf"
            seconds = llamacpp.quantize(f16, files[qtype], qtype)
            rows.append({"type": qtype, "seconds": seconds, "mb": files[qtype].stat().st_size / MB, "input_mb": rows[0]["mb"]})
        for row in rows:
            with closing(llamacpp.load(files[row["type"]], n_ctx=len(ids) + args.tokens + 8)) as llm:
                llamacpp.greedy(llm, ids, 4, set())  # warm-up
                row["tokens_per_s"] = max(llamacpp.greedy(llm, ids, args.tokens, set())[1] for _ in range(args.runs))
        hf = hf_tokens_per_s(model_dir, ids, args.tokens, args.runs)

    print(f"model: {'tiny random Gemma 3' if args.tiny else 'embedded Gemma 3 270M'} ({source_mb:.0f} MB safetensors), "
          f"{os.cpu_count()} threads, {args.tokens} new tokens, greedy")
    print(f"{'type':8} {'seconds':>8} {'MB in/s':>8} {'size MB':>8} {'tok/s':>8} {'x HF fp32':>10}")
    for row in rows:
        row["mb_per_s"] = row["input_mb"] / row["seconds"]
        row["vs_transformers_fp32"] = row["tokens_per_s"] / hf
        print(f"{row['type']:8} {row['seconds']:8.2f} {row['mb_per_s']:8.1f} {row['mb']:8.1f} {row['tokens_per_s']:8.1f} {row['vs_transformers_fp32']:9.2f}x")
    print(f"{'HF fp32':8} {'':8} {'':8} {source_mb:8.1f} {hf:8.1f} {1:9.2f}x")
    print(f"export total: {sum(r['seconds'] for r in rows):.1f} s (conversion {rows[0]['seconds']:.1f} s, "
          f"includes the converter's own torch/transformers import)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "tiny" if args.tiny else "embedded:gemma-3-270m", "tokens": args.tokens,
                                    "threads": os.cpu_count(), "transformers_fp32_tokens_per_s": hf, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
