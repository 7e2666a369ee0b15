"""A seed recipe for real on a CUDA machine: base download, N training steps, merge, GGUF, eval; prints the numbers.

    .venv/bin/python benchmarks/gpu_seed.py recipes/llama-3.1-8b/persian-qa-qlora.yaml --steps 50
    .venv/bin/python benchmarks/gpu_seed.py recipes/gemma-3-12b-it/turkish-alpaca-qlora.yaml --steps 20 --eval-rows 100

Runs `hubforge run RECIPE` (data → train → merge → evaluate → gguf → card; never publish) with `train.max_steps=N`
and `eval.max_samples=--eval-rows` and nothing else changed: the real base and dataset from the Hub (gated bases
need HF_TOKEN with access), the recipe's method, precision and quantization. Then prints, from the run directory's
manifest and results: training tokens/s (non-padding tokens seen / train seconds), peak GPU memory (the train
stage's torch.cuda.max_memory_allocated), the eval numbers (perplexity base vs tuned, EM/F1 overall / answerable /
unanswerable, lm-eval tasks) and the GGUF files; also written to benchmarks/results/gpu_seed-<name>.json.

Refuses without CUDA (a CPU run of a 8-12B base is not a benchmark; use `hubforge run RECIPE --standin` there).
UNTESTED: written and checked on a CPU-only machine; no CUDA machine has run it yet.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--steps", type=int, default=50, help="train.max_steps (default 50)")
    parser.add_argument("--eval-rows", type=int, default=200, help="eval.max_samples (default 200)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default runs/gpu_seed/<recipe stem>")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_seed: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); this benchmark "
              "runs a seed recipe for real and needs a CUDA GPU. On CPU use `hubforge run RECIPE --standin`.", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    run_dir = args.run_dir or REPO / "runs" / "gpu_seed" / args.recipe.stem
    cmd = [sys.executable, "-m", "hubforge.cli", "run", str(args.recipe), "--run-dir", str(run_dir),
           "--set", f"train.max_steps={args.steps}", "--set", f"eval.max_samples={args.eval_rows}"]
    print("$ " + " ".join(cmd), flush=True)
    started = time.time()
    code = subprocess.call(cmd, cwd=REPO)
    wall = time.time() - started
    if code:
        print(f"gpu_seed: the run failed (exit {code}); see {run_dir}/manifest.json", file=sys.stderr)
        return code

    manifest = json.loads((run_dir / "manifest.json").read_text("utf-8"))
    stages = manifest["stages"]
    train = stages["train"]["result"]
    results = json.loads((run_dir / "evaluate" / "results.json").read_text("utf-8"))
    report = {
        "recipe": str(args.recipe), "device": device, "torch": torch.__version__, "steps": train["steps"],
        "wall_seconds": round(wall, 1),
        "stage_seconds": {name: entry.get("seconds") for name, entry in stages.items()},
        "train_tokens_per_second": round(train["tokens_seen"] / train["seconds"], 1) if train["seconds"] else None,
        "peak_gpu_gib": round(train["peak_gpu_mb"] / 1024, 2) if train.get("peak_gpu_mb") else None,
        "precision": train["precision"], "trainable_params": train["trainable_params"],
        "loss_first_final": [train["first_loss"], train["final_loss"]],
        "perplexity": {k: v.get("perplexity") for k, v in (results.get("perplexity", {}).get("results") or {}).items()},
        "qa": results.get("qa", {}).get("results"),
        "lm_eval": results.get("lm_eval", {}).get("tasks"),
        "gguf": (stages.get("gguf", {}).get("result") or {}).get("files"),
    }
    out = REPO / "benchmarks" / "results" / f"gpu_seed-{args.recipe.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str), "utf-8")
    print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
