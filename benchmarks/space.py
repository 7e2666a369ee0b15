"""The Space app's speed as a user sees it: time to first token and tokens/s through the running app, GGUF vs transformers.

    .venv/bin/python benchmarks/space.py                  # tiny random Gemma 3 (~1 min)
    .venv/bin/python benchmarks/space.py --embedded       # the embedded Gemma 3 270M base (~3 min, 2 cores)

Both backends serve the same weights in the same run: the checkpoint itself through transformers (fp32, the app's
choice on CPU) and its Q4_K_M GGUF (llama.cpp's converter + quantizer) through llama-cpp-python. Each app runs as on
a Space (`python space/app.py`, offline), one at a time, and is driven by gradio_client: a warm-up turn, then
--runs greedy turns on fresh sessions. Time to first token = submit -> first streamed text at the client; tokens/s =
(reply tokens - 1) / (time after the first token), reply tokens as the app counted them (`/status`). Medians are
printed with the GGUF/transformers ratio and written to benchmarks/results/space.json.

The tiny model is a smoke test, not a measurement: its random weights emit lone UTF-8 bytes, which llama-cpp-python
holds back until they form a character, so GGUF replies arrive in bursts. Quote --embedded numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests" / "fixtures"), str(REPO / "tests" / "fixtures" / "space")]
# Before anything imports huggingface_hub: the client must not wait on Hub lookups (see space_testing.CLIENT_ENV).
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"})

import space_testing  # noqa: E402

PROMPTS = ["سلام! لطفاً خودت را در یک جمله معرفی کن.", "پایتخت ایران کجاست؟", "یک جملهٔ کوتاه دربارهٔ بهار بنویس.",
           "سه میوهٔ تابستانی نام ببر.", "چرا آسمان آبی است؟"]


def checkpoint(embedded: bool, work: Path) -> Path:
    if not embedded:
        from tiny_model import build_tiny_gemma3

        return build_tiny_gemma3(work / "tiny")
    from hubforge.base import resolve_base
    from hubforge.recipe import resolve

    recipe = resolve({"name": "space-bench", "base": {"model": "embedded:gemma-3-270m"},
                      "data": {"files": ["recipes/data/persian-chat.jsonl"], "format": "messages"},
                      "method": {"name": "lora"}}, root=REPO)
    return resolve_base(recipe)


def measure(url: str, runs: int, max_new_tokens: int) -> dict:
    space_testing.stream_chat(url, PROMPTS[0], max_new_tokens=16)  # warm-up: first-call allocations, caches
    ttft, rate, tokens = [], [], []
    for i in range(runs):
        _, _, first, total = space_testing.stream_chat(url, PROMPTS[i % len(PROMPTS)], max_new_tokens=max_new_tokens)
        n = space_testing.client(url).predict(api_name="/status")["last_reply_tokens"]  # counted by the app
        ttft.append(first)
        tokens.append(n)
        if n > 1 and total > first:
            rate.append((n - 1) / (total - first))
    return {"ttft_s": round(statistics.median(ttft), 3), "tokens_per_s": round(statistics.median(rate), 1) if rate else None,
            "reply_tokens": round(statistics.mean(tokens), 1), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embedded", action="store_true", help="the embedded Gemma 3 270M base instead of the tiny model")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hubforge-space-bench-") as tmp:
        work = Path(tmp)
        model_dir = checkpoint(args.embedded, work)
        gguf = space_testing.make_gguf(model_dir, work / "gguf", "Q4_K_M")
        results = {}
        for backend, env in (("gguf Q4_K_M", {"BACKEND": "gguf", "GGUF_PATH": str(gguf)}),
                             ("transformers fp32", {"BACKEND": "transformers", "MODEL_PATH": str(model_dir)})):
            with space_testing.running_app(env, work / f"{env['BACKEND']}.log", timeout=600) as url:
                results[backend] = measure(url, args.runs, args.max_new_tokens)
            print(f"{backend:18s} first token {results[backend]['ttft_s']:.3f} s   {results[backend]['tokens_per_s']} tokens/s   "
                  f"({results[backend]['reply_tokens']} tokens/reply, median of {args.runs})", flush=True)

    g, t = results["gguf Q4_K_M"], results["transformers fp32"]
    ratio = {"tokens_per_s": round(g["tokens_per_s"] / t["tokens_per_s"], 2) if g["tokens_per_s"] and t["tokens_per_s"] else None,
             "ttft": round(t["ttft_s"] / g["ttft_s"], 2)}
    print(f"GGUF vs transformers: {ratio['tokens_per_s']}x tokens/s, first token {ratio['ttft']}x sooner")
    out = REPO / "benchmarks" / "results" / "space.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "embedded:gemma-3-270m" if args.embedded else "tiny", "cpus": os.cpu_count(),
                               "max_new_tokens": args.max_new_tokens, "results": results, "gguf_over_transformers": ratio},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
