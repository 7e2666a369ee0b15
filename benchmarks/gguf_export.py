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
imported and its thread pool started, PASSIVE, all cores; best of --runs, and as the stage times it: one 32-token
run) measured in the same run.

    .venv/bin/python benchmarks/gguf_export.py --speed-only F16.gguf Q4_K_M.gguf   # only the second table
    .venv/bin/python benchmarks/gguf_export.py --speed-only F16.gguf Q4_K_M.gguf --other-build /tmp/v512/bin/python

Two more rows: llama_decode called directly, one token at a time (is the binding's generate() the cost?), and with
--other-build a Python whose llama_cpp has other build flags (are the portable AVX2 flags the cost?).
What it found on the 2-core development VM (2026-11-30, idle): every setup lands at 22-27 tok/s for F16 and
33-42 for Q4_K_M, run-to-run noise ±15 %; raw llama_decode is no faster than generate(); an AVX-512/VNNI build
(CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON")
is no faster; the PyPI Q4_K_M file an early note timed at ~88 tok/s decodes at 34-42 here. Decoding this model
reads every weight once per token (the tied 262,144 x 640 head included), and the VM reads memory at ~8-13 GB/s
(numpy sum/copy of 1 GiB): 543 MB x 25 tok/s = 13.6 GB/s is that limit. The early figures came from a host with
more memory bandwidth; the only in-process cost left is torch's (its OpenMP pool; ~10 % in the "stage" rows).

`--quality` measures instead what a user downloads, one table in one run: every standard type without and with an
importance matrix (hubforge.gguf_imatrix, tied output head included), and the KL-budgeted AUTO mixture
(hubforge.gguf_auto), each with its size, llama.cpp's KL divergence from the F16 file (mean, 99th percentile,
same top token), perplexity, and tokens/s in a fresh process without torch (2 threads, OMP_WAIT_POLICY=PASSIVE:
see ALONE), with ratios to the F16 file measured in the same run.

    .venv/bin/python benchmarks/gguf_export.py --quality --tiny --work /tmp/gq-tiny       # smoke test (~3 min)
    .venv/bin/python benchmarks/gguf_export.py --quality --model runs/.../merge/model     # a merged fine-tune

Text: the shipped Persian chat data rendered with the model's chat template, shuffled with a fixed seed, split into
a calibration part (importance matrix; control tokens kept, llama-imatrix parses them) and a held-out part for
measuring (turn markers removed: llama-perplexity does not parse control tokens, and their spelled-out pieces
would be positions no user ever sees). llama-perplexity scores the second half of each --ctx chunk. Results go to
benchmarks/results/gguf_quality.json, llama.cpp's output to <work>/llama.log; `--work` keeps the F16 file, the
importance matrix and the F16 reference logits between runs (`--f16` names an F16 GGUF already converted).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
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
def raw(n):  # llama_decode alone, one token at a time: no sampler, no Python generator
    batch = llama_cpp.llama_batch_init(1, 0, 1)
    for pos, tok in enumerate(ids):
        batch.n_tokens, batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = 1, tok, pos, 1, True
        batch.seq_id[0][0] = 0
        llama_cpp.llama_decode(llm.ctx, batch)
    started = time.perf_counter()
    for pos in range(len(ids), len(ids) + n - 1):
        batch.token[0], batch.pos[0] = ids[-1], pos
        llama_cpp.llama_decode(llm.ctx, batch)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, 0, -1)
    return (n - 1) / (time.perf_counter() - started)
timed = raw if {raw} else rate
timed(4)
print(json.dumps(max(timed({tokens}) for _ in range({runs}))))
"""
SETTINGS = [  # (label, torch imported, OMP_WAIT_POLICY or None for unset, threads or None for all cores, runs)
    # the stage's own method: after a warm-up, ONE run of 32 tokens (llamacpp.greedy in stages/gguf.py), no best-of
    ("stage exactly: as above, one 32-token run", True, "PASSIVE", None, 1),
    ("stage: torch + PASSIVE, all cores", True, "PASSIVE", None, None),
    ("no torch, policy unset, 2 threads", False, None, 2, None), ("no torch, PASSIVE, 2 threads", False, "PASSIVE", 2, None),
    ("no torch, ACTIVE, 2 threads", False, "ACTIVE", 2, None), ("no torch, PASSIVE, 1 thread", False, "PASSIVE", 1, None),
    ("no torch, policy unset, 1 thread", False, None, 1, None),
]
# The --quality table's tokens/s: llama.cpp alone on 2 threads, PASSIVE because with the policy unset (or ACTIVE)
# OpenMP's spinning threads collapse to a few tokens/s whenever another process shares the cores (measured here).
ALONE = SETTINGS[3]


def probe(path: Path, with_torch: bool, policy: str | None, threads: int | None, tokens: int, runs: int,
          raw: bool = False, python: str = sys.executable) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": policy} if policy else {})
    code = PROBE.format(torch=with_torch, path=str(path), threads=threads or os.cpu_count(), prompt=PROMPT,
                        tokens=tokens, runs=runs, raw=raw)
    proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"speed probe on {path.name} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def speed_table(files: dict[str, Path], tokens: int, runs: int, other_build: str | None = None) -> list[dict]:
    """tokens/s of each file under each of SETTINGS, then llama_decode alone (is the binding's generate() the
    cost?) and, with `other_build` (a Python whose llama_cpp was built with other flags), the ALONE setup with
    that build (are the build flags the cost?); printed as one table and returned as rows."""
    import llama_cpp

    print(f"\nllama.cpp tokens/s by process setup ({tokens} new tokens, best of {runs}, n_ctx=512; "
          f"llama.cpp system info: {llama_cpp.llama_print_system_info().decode().strip()})")
    print(f"{'setup':48} " + " ".join(f"{name:>8}" for name in files))
    extra = [("no torch, PASSIVE, 2 threads, llama_decode alone", False, "PASSIVE", 2, None, True, sys.executable)]
    if other_build:
        info = subprocess.run([other_build, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                              capture_output=True, text=True, check=True).stdout.strip()
        print(f"other build ({other_build}): {info}")
        extra.append(("no torch, PASSIVE, 2 threads, other build", False, "PASSIVE", 2, None, False, other_build))
    rows = []
    for label, with_torch, policy, threads, once, *how in [(*s, False, sys.executable) for s in SETTINGS] + extra:
        n, r = (32, once) if once else (tokens, runs)
        row = {"setup": label, **{name: probe(path, with_torch, policy, threads, n, r, *how) for name, path in files.items()}}
        rows.append(row)
        print(f"{label:48} " + " ".join(f"{row[name]:8.1f}" for name in files))
    return rows


def texts(model_dir: Path, work: Path, heldout: float, seed: int = 3407) -> tuple[Path, Path]:
    """The calibration and held-out text files (see the module docstring)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line)["messages"] for line in (REPO / "recipes/data/persian-chat.jsonl").read_text("utf-8").splitlines()]
    random.Random(seed).shuffle(rows)
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows]
    cut = int(len(rendered) * (1 - heldout))
    calib, held = work / "calibration.txt", work / "heldout.txt"
    calib.write_text("".join(rendered[:cut]).removeprefix(tokenizer.bos_token), "utf-8")  # llama.cpp adds one
    plain = "".join(rendered[cut:])
    for marker in ("<bos>", "<start_of_turn>", "<end_of_turn>"):
        plain = plain.replace(marker, "")
    held.write_text(plain, "utf-8")
    return calib, held


def cached_json(path: Path, make) -> dict:
    """`path`'s JSON if a former run (--work) left it, else make()'s result, saved there."""
    if not path.is_file():
        path.write_text(json.dumps(make()))
    return json.loads(path.read_text())


def quality(args) -> None:
    """The --quality table (see the module docstring)."""
    from hubforge import gguf_auto, gguf_imatrix, llamacpp, llamatools

    work, started = args.work, time.time()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "llama.log"
    model_dir = args.model or checkpoint(args.tiny, work)
    f16 = args.f16 or work / "model-F16.gguf"
    if not f16.is_file():
        llamacpp.convert_model(llamacpp.converter_input(model_dir, work / "view"), f16, "F16")
    calib, held = texts(model_dir, work, args.heldout)
    imatrix, logits = work / "imatrix.gguf", work / "f16.kld"
    for made, record in ((imatrix, "imatrix.json"), (logits, "f16.kld.json")):
        if not made.is_file():
            (work / record).unlink(missing_ok=True)
    info = cached_json(work / "imatrix.json", lambda: gguf_imatrix.compute(f16, calib, imatrix, log=log, ctx=args.ctx))
    base = cached_json(work / "f16.kld.json", lambda: llamatools.kld_base(f16, held, logits, log=log, ctx=args.ctx))
    print(f"importance matrix: {info}; F16 reference: PPL {base['ppl']:.3f}", flush=True)

    def measure(name: str, path: Path, measured: dict, **extra) -> dict:
        row = {"name": name, "mib": path.stat().st_size / MB, **{k: measured[k] for k in ("mean_kld", "p99_kld", "same_top", "ppl")},
               "tokens_per_s": probe(path, *ALONE[1:4], args.tokens, args.runs), **extra}
        print(f"{name:12} {row['mib']:7.1f} MiB  KLD {row['mean_kld']:.4f}  top1 {row['same_top']:.3f}  "
              f"{row['tokens_per_s']:.1f} tok/s", flush=True)
        return row

    rows = [measure("F16", f16, {"mean_kld": 0.0, "p99_kld": 0.0, "same_top": 1.0, "ppl": base["ppl"]})]  # the reference
    for qtype in args.quants.split(","):
        for imat in (None, imatrix):
            name = f"{qtype}{'-imat' if imat else ''}"
            out = work / f"model-{name}.gguf"
            seconds = llamatools.quantize(f16, out, qtype, log=log, imatrix=imat)
            rows.append(measure(name, out, llamatools.kld(out, logits, log=log, ctx=args.ctx), quantize_s=seconds))
    limits = {"disagree": 1 - args.min_top1, "ln_ppl_ratio": math.log(args.max_ppl_ratio)}
    print(f"AUTO: each group alone below Q8_0 (importance matrix on), then the smallest mixture within {limits}:")
    try:
        auto = gguf_auto.auto(f16, work, logits, limits, log=log, imatrix=imatrix, out=work / "model-AUTO.gguf", ctx=args.ctx)
        rows.append(measure("AUTO-imat", Path(auto["file"]), auto["measured"], meets=auto["meets"]))
    except ValueError as error:  # no mixture of the candidate types fits: the table says so instead of a row
        auto = {"error": str(error)}

    ref = rows[0]
    print(f"\nmodel: {model_dir}; held-out text {held.stat().st_size} bytes, ctx {args.ctx}; tokens/s: {args.tokens} new "
          f"tokens after a {len(PROMPT)}-character prompt, best of {args.runs}, llama.cpp alone ({ALONE[0]})")
    print(f"{'file':12} {'MiB':>7} {'x F16':>6} {'mean KLD':>9} {'p99 KLD':>8} {'same top':>9} {'PPL':>9} {'x F16':>6} "
          f"{'tok/s':>7} {'x F16':>6}")
    for r in rows:
        print(f"{r['name']:12} {r['mib']:7.1f} {r['mib'] / ref['mib']:6.3f} {r['mean_kld']:9.4f} {r['p99_kld']:8.3f} "
              f"{100 * r['same_top']:8.1f}% {r['ppl']:9.3f} {r['ppl'] / ref['ppl']:6.3f} {r['tokens_per_s']:7.1f} "
              f"{r['tokens_per_s'] / ref['tokens_per_s']:6.2f}")
    if "types" in auto:
        print(f"AUTO types: {auto['types']} (meets {limits}: {auto['meets']}, tries: {auto['tries']})\nreproduce: "
              f"llama-quantize {' '.join(auto['quantize_args'])} F16.gguf AUTO.gguf {gguf_auto.REFERENCE}")
    else:
        print(f"AUTO: {auto['error']}")
    print(f"total {time.time() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(model_dir), "ctx": args.ctx, "heldout_bytes": held.stat().st_size,
                                    "tokens": args.tokens, "imatrix": info, "limits": limits, "rows": rows, "auto": auto},
                                   indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quants", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/gguf_export.json, "
                        "or gguf_quality.json with --quality)")
    parser.add_argument("--speed-only", nargs="+", type=Path, metavar="GGUF", help="only the process-setup table")
    parser.add_argument("--other-build", metavar="PYTHON", help="a Python whose llama_cpp has other build flags "
                        "(e.g. AVX-512): one more row of the process-setup table")
    quality_args = parser.add_argument_group("--quality", "size, KL, perplexity and tokens/s of plain, imatrix and AUTO")
    quality_args.add_argument("--quality", action="store_true")
    quality_args.add_argument("--model", type=Path, help="HF checkpoint folder (default: the embedded Gemma 3 270M)")
    quality_args.add_argument("--f16", type=Path, help="an F16 GGUF of --model already converted")
    quality_args.add_argument("--work", type=Path, default=Path("/tmp/gguf-quality"), help="kept between runs")
    quality_args.add_argument("--ctx", type=int, default=512)
    quality_args.add_argument("--heldout", type=float, default=0.4, help="share of conversations held out for measuring")
    quality_args.add_argument("--min-top1", type=float, default=0.90, help="AUTO's budget: same top token share")
    quality_args.add_argument("--max-ppl-ratio", type=float, default=1.05, help="AUTO's budget: perplexity / F16's")
    args = parser.parse_args()
    args.out = args.out or REPO / "benchmarks" / "results" / f"gguf_{'quality' if args.quality else 'export'}.json"
    if args.quality:
        quality(args)
        return
    if args.speed_only:
        short = [p.stem.rsplit("-", 1)[-1] for p in args.speed_only]  # the type, or the whole stem if two share one
        speed_table({(n if short.count(n) == 1 else p.stem): p for n, p in zip(short, args.speed_only)}, args.tokens,
                    args.runs, args.other_build)
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
        speeds = speed_table({t: files[t] for t in ("F16", "Q4_K_M") if t in files}, args.tokens, args.runs,
                             args.other_build)
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
