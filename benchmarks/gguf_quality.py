"""GGUF quality with llama.cpp's own tools on a real checkpoint: the standard types with and without an importance
matrix, each tensor group's sensitivity, and the smallest KL-budgeted mixture (hubforge.gguf_auto), all measured
with `llama-perplexity --kl-divergence` against the F16 file on held-out chat text, in one run.

    .venv/bin/python benchmarks/gguf_quality.py                          # the embedded Gemma 3 270M base
    .venv/bin/python benchmarks/gguf_quality.py --model runs/.../merge/model   # a merged fine-tune

Text: the shipped Persian chat data rendered with the model's chat template, shuffled with a fixed seed, split into
a calibration part (importance matrix; control tokens kept, llama-imatrix parses them) and a held-out part for
measuring (turn markers removed: llama-perplexity does not parse control tokens, and their spelled-out pieces
would be positions no user ever sees). Results go to benchmarks/results/gguf_quality.json; llama.cpp's output to
<work>/llama.log. `--work` keeps files between runs (the F16 file, imatrix and reference logits are reused).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
MB = 2**20
MARKERS = ("<bos>", "<start_of_turn>", "<end_of_turn>")


def texts(model_dir: Path, work: Path, heldout: float, seed: int) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line)["messages"] for line in (REPO / "recipes/data/persian-chat.jsonl").read_text("utf-8").splitlines()]
    random.Random(seed).shuffle(rows)
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows]
    cut = int(len(rendered) * (1 - heldout))
    calib, held = work / "calibration.txt", work / "heldout.txt"
    calib.write_text("".join(rendered[:cut]).removeprefix(tokenizer.bos_token), "utf-8")  # llama.cpp adds one
    plain = "".join(rendered[cut:])
    for marker in MARKERS:
        plain = plain.replace(marker, "")
    held.write_text(plain, "utf-8")
    return calib, held


def row(name: str, path: Path, measured: dict, seconds: float | None = None) -> dict:
    return {"name": name, "mb": path.stat().st_size / MB, **{k: measured[k] for k in
            ("mean_kld", "p99_kld", "same_top", "ppl")}, "quantize_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF checkpoint folder (default: the embedded Gemma 3 270M)")
    parser.add_argument("--f16", type=Path, help="an F16 GGUF of --model already converted")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-quality"))
    parser.add_argument("--quants", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--heldout", type=float, default=0.4, help="share of conversations held out for measuring")
    parser.add_argument("--min-top1", type=float, default=0.90)
    parser.add_argument("--max-ppl-ratio", type=float, default=1.05)
    parser.add_argument("--max-kl", type=float, help="also budget the mean KL divergence")
    parser.add_argument("--per-layer", default="", help="comma-separated groups to split per block, e.g. ffn_down")
    parser.add_argument("--no-auto", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gguf_quality.json")
    args = parser.parse_args()

    from hubforge import gguf_auto, llamacpp, llamatools

    work, started = args.work, time.time()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "llama.log"
    if args.model is None:
        from hubforge.base import embedded_dir

        args.model = embedded_dir()
    f16 = args.f16 or work / "model-F16.gguf"
    if not f16.is_file():
        llamacpp.convert_model(llamacpp.converter_input(args.model, work / "view"), f16, "F16")
    calib, held = texts(args.model, work, args.heldout, seed=3407)
    imatrix, logits = work / "imatrix.gguf", work / "f16.kld"
    if not imatrix.is_file():
        print(f"imatrix: {llamatools.imatrix(f16, calib, imatrix, log=log, ctx=args.ctx):.1f} s")
    base_json = work / "f16.kld.json"
    if not logits.is_file() or not base_json.is_file():
        base = llamatools.kld_base(f16, held, logits, log=log, ctx=args.ctx)
        base_json.write_text(json.dumps(base))
        print(f"F16 reference logits: {base['seconds']:.1f} s, PPL {base['ppl']:.3f}")
    base = json.loads(base_json.read_text())  # the F16 row is the reference itself: KL 0, same top token everywhere
    rows = [row("F16", f16, {"mean_kld": 0.0, "p99_kld": 0.0, "same_top": 1.0, "ppl": base["ppl"]})]
    for qtype in args.quants.split(","):
        for imat in (None, imatrix):
            name = f"{qtype}{'-imat' if imat else ''}"
            out = work / f"model-{name}.gguf"
            seconds = llamatools.quantize(f16, out, qtype, log=log, imatrix=imat)
            rows.append(row(name, out, llamatools.kld(out, logits, log=log, ctx=args.ctx), seconds))
            print(f"{name:12} {rows[-1]['mb']:7.1f} MB  KLD {rows[-1]['mean_kld']:.4f}  top1 {rows[-1]['same_top']:.3f}")
    auto = None
    if not args.no_auto:
        limits = {"disagree": 1 - args.min_top1, "ln_ppl_ratio": math.log(args.max_ppl_ratio)}
        if args.max_kl:
            limits["mean_kld"] = args.max_kl
        print(f"sensitivity (each group alone below Q8_0, importance matrix on) and auto choice for {limits}:")
        auto = gguf_auto.auto(f16, work / "auto", logits, limits, log=log, imatrix=imatrix, out=work / "model-auto.gguf",
                              per_layer=tuple(filter(None, args.per_layer.split(","))), ctx=args.ctx)
        rows.append(row("auto-imat", Path(auto["file"]), auto["measured"]))

    f16_ppl = rows[0]["ppl"]
    print(f"\nmodel: {args.model}; held-out text {held.stat().st_size} bytes, ctx {args.ctx} (llama-perplexity scores "
          f"the second half of each chunk)")
    print(f"{'file':12} {'MB':>7} {'mean KLD':>9} {'p99 KLD':>8} {'same top':>9} {'PPL':>8} {'PPL/F16':>8}")
    for r in rows:
        print(f"{r['name']:12} {r['mb']:7.1f} {r['mean_kld']:9.4f} {r['p99_kld']:8.3f} {100 * r['same_top']:8.1f}% "
              f"{r['ppl']:8.3f} {r['ppl'] / f16_ppl:8.3f}")
    if auto:
        print(f"auto types: {auto['types']}\nreproduce: llama-quantize {' '.join(auto['quantize_args'])} F16.gguf "
              f"out.gguf Q4_K_M   (meets the gate: {auto['meets']}, tries: {auto['tries']})")
    print(f"total {time.time() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "ctx": args.ctx, "heldout_bytes": held.stat().st_size,
                                    "rows": rows, "auto": auto}, indent=2, default=str))


if __name__ == "__main__":
    main()
