"""GGUF export speed on the embedded Gemma 3 270M: conversion and quantization seconds and MB/s, and generation
tokens/s of every GGUF type vs the transformers float32 model, all measured in the same run.

    .venv/bin/python benchmarks/gguf_export.py                      # PYTHONPATH=src if hubforge is not installed
    .venv/bin/python benchmarks/gguf_export.py --tiny               # smoke test on a tiny random Gemma 3 (~1 min)

The checkpoint comes from hubforge.base.resolve_base (the shipped persian-chat-lora recipe's base); conversion
and quantization are the gguf stage's own calls (hubforge.llamacpp). Generation: the same chat-formatted prompt,
greedy, --tokens new tokens; tokens/s counts decoding only (after the first token) for both backends. For
transformers, decoding time is generate(N) - generate(1), each the best of --runs. Results are printed with
ratios and written to benchmarks/results/gguf_export.json.

A second table asks why the gguf stage reports fewer tokens/s than llama.cpp alone: the F16 and Q4_K_M files are
timed in fresh processes that load only llama_cpp (no torch), with OpenMP's wait policy unset (libgomp spins, then
sleeps), PASSIVE (what hubforge sets at import) and ACTIVE, on 1 and 2 threads, next to the stage's own way (torch
imported and its thread pool started, PASSIVE, all cores) measured in the same run.

    .venv/bin/python benchmarks/gguf_export.py --speed-only F16.gguf Q4_K_M.gguf   # only the second table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
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


# One timing in a fresh process: only llama_cpp (or torch first, with its OpenMP pool started, as in the stage).
PROBE = """
import json, sys, time
if {torch}:
    import torch
    torch.ones(256, 256) @ torch.ones(256, 256)
import llama_cpp
llm = llama_cpp.Llama(model_path={path!r}, n_ctx=512, n_threads={threads}, verbose=False)
ids = llm.tokenize({prompt!r}.encode())
def rate(n):
    out, first = 0, time.perf_counter()
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out += 1
        if out == 1:
            first = time.perf_counter()
        if out >= n:
            return (n - 1) / (time.perf_counter() - first)
rate(4)
print(json.dumps(max(rate({tokens}) for _ in range({runs}))))
"""
SETTINGS = [  # (label, torch imported, OMP_WAIT_POLICY or None for unset, threads or None for all cores)
    ("stage: torch + PASSIVE, all cores", True, "PASSIVE", None), ("no torch, policy unset, 2 threads", False, None, 2),
    ("no torch, PASSIVE, 2 threads", False, "PASSIVE", 2), ("no torch, ACTIVE, 2 threads", False, "ACTIVE", 2),
    ("no torch, PASSIVE, 1 thread", False, "PASSIVE", 1), ("no torch, policy unset, 1 thread", False, None, 1),
]


def probe(path: Path, with_torch: bool, policy: str | None, threads: int | None, tokens: int, runs: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": policy} if policy else {})
    code = PROBE.format(torch=with_torch, path=str(path), threads=threads or os.cpu_count(), prompt=PROMPT,
                        tokens=tokens, runs=runs)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"speed probe on {path.name} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def speed_table(files: dict[str, Path], tokens: int, runs: int) -> list[dict]:
    """tokens/s of each file under each of SETTINGS, printed as one table and returned as rows."""
    import llama_cpp

    print(f"\nllama.cpp tokens/s by process setup ({tokens} new tokens, best of {runs}, n_ctx=512; "
          f"llama.cpp system info: {llama_cpp.llama_print_system_info().decode().strip()})")
    print(f"{'setup':36} " + " ".join(f"{name:>8}" for name in files))
    rows = []
    for label, with_torch, policy, threads in SETTINGS:
        row = {"setup": label, **{name: probe(path, with_torch, policy, threads, tokens, runs) for name, path in files.items()}}
        rows.append(row)
        print(f"{label:36} " + " ".join(f"{row[name]:8.1f}" for name in files))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quants", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gguf_export.json")
    parser.add_argument("--speed-only", nargs="+", type=Path, metavar="GGUF", help="only the process-setup table")
    args = parser.parse_args()
    if args.speed_only:
        speed_table({p.stem.rsplit("-", 1)[-1]: p for p in args.speed_only}, args.tokens, args.runs)
        return

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
        speeds = speed_table({t: files[t] for t in ("F16", "Q4_K_M") if t in files}, args.tokens, args.runs)
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
                                    "threads": os.cpu_count(), "transformers_fp32_tokens_per_s": hf, "rows": rows,
                                    "llama_cpp_by_process_setup": speeds}, indent=2))


if __name__ == "__main__":
    main()
