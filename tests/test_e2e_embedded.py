"""The embedded default recipe end to end, the way `make demo` runs it (slow tier).

`hubforge demo` in a fresh process: local Hub, data → train → merge → evaluate → gguf → card → publish → space,
with two quant types so CI stays quick. Then a second process (a fresh client) downloads
what was published and checks it is usable and honestly documented.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/gemma-3-270m/persian-chat-lora.yaml"
# The recipe as shipped (56 steps, ~1.5 min of training: issue #14's goal is measured on this model; at 16 steps
# even Q8_0's perplexity is 14 % above F16's, so no mixture can meet a 5 % budget), with two standard quant types.
SHORT = ["export.gguf.quants=[Q8_0, Q4_K_M]"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    cmd = [sys.executable, "-m", "hubforge.cli", "demo", str(RECIPE), "--no-serve", "--data-dir", str(work / "hub"),
           "--run-dir", str(work / "run")] + [a for s in SHORT for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    yield work, proc.stdout
    if not os.environ.get("HUBFORGE_KEEP_TEST_RUNS"):  # set it to look at the run afterwards
        shutil.rmtree(work, ignore_errors=True)  # ~3 GB of checkpoints, merged model and GGUF files


def test_every_stage_finished_and_the_manifest_says_so(demo_run):
    work, stdout = demo_run
    manifest = json.loads((work / "run/manifest.json").read_text())
    statuses = {name: entry["status"] for name, entry in manifest["stages"].items()}
    assert statuses == {s: "done" for s in ("data", "train", "merge", "evaluate", "gguf", "card", "publish", "space")}, statuses
    train = manifest["stages"]["train"]["result"]
    assert train["steps"] == 56 and train["tokens_seen"] > 0
    assert "== hubforge demo ==" in stdout


def test_loss_fell_and_eval_is_base_vs_tuned(demo_run):
    work, _ = demo_run
    log = [json.loads(line) for line in (work / "run/train/log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    assert len(losses) >= 8 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    results = json.loads((work / "run/evaluate/results.json").read_text())
    text = json.dumps(results)
    assert "perplexity" in text and "base" in text and "tuned" in text
    # The GGUF table's perplexity counts the same held-out tokens as the card's tuned number: the F16 file (the
    # merged weights, exactly) must land on the merged model's perplexity.
    quality = json.loads((work / "run/gguf/quality.json").read_text())
    merged = results["perplexity"]["results"]["merged"]
    assert quality["held_out"]["tokens_scored"] == results["perplexity"]["tokens_scored"] == "assistant"
    assert quality["held_out"]["scored_tokens"] == merged["tokens"]
    assert abs(quality["files"][0]["perplexity"] / merged["perplexity"] - 1) < 0.02, (quality["files"][0], merged)


def test_published_repos_are_usable_from_a_fresh_client(demo_run):
    work, _ = demo_run
    script = textwrap.dedent(f"""
        import json, os, pathlib
        from hubforge.demo import free_port, point_client_at_local_hub
        port = free_port(); point_client_at_local_hub(port)
        from hubforge.hub import serve
        hub = serve(pathlib.Path({str(work / 'hub')!r}), port=port)
        try:
            os.environ["HF_TOKEN"] = hub.token_path.read_text().strip()
            from huggingface_hub import HfApi, ModelCard, snapshot_download
            repos = {{"adapter": "hubforge/gemma-3-270m-persian-chat-lora", "merged": "hubforge/gemma-3-270m-persian-chat",
                     "gguf": "hubforge/gemma-3-270m-persian-chat-GGUF"}}
            out = {{}}
            for kind, repo in repos.items():
                folder = pathlib.Path(snapshot_download(repo))
                card = ModelCard.load(repo)
                out[kind] = {{"files": sorted(p.name for p in folder.iterdir()), "license": card.data.license,
                             "base_model": card.data.base_model, "has_index": bool(card.data.eval_results)}}
            import llama_cpp
            gguf = next(pathlib.Path(snapshot_download(repos["gguf"])).glob("*Q4_K_M.gguf"))
            llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, verbose=False)
            reply = llm.create_chat_completion([{{"role": "user", "content": "پایتخت فرانسه کجاست؟"}}], max_tokens=16, temperature=0)
            out["gguf_reply"] = reply["choices"][0]["message"]["content"]
            print(json.dumps(out, ensure_ascii=False))
        finally:
            hub.stop()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "adapter_model.safetensors" in out["adapter"]["files"] and "README.md" in out["adapter"]["files"]
    assert "model.safetensors" in out["merged"]["files"] and "tokenizer.model" in out["merged"]["files"]
    assert any(f.endswith("Q4_K_M.gguf") for f in out["gguf"]["files"])
    # the embedded recipe's KL-budgeted mixture and the importance matrix are published beside the standard types
    assert {"gemma-3-270m-persian-chat-AUTO.gguf", "gemma-3-270m-persian-chat.imatrix"} <= set(out["gguf"]["files"])
    for kind in ("adapter", "merged", "gguf"):
        assert out[kind]["license"] == "gemma"          # a Gemma derivative keeps Gemma's terms
        assert out[kind]["has_index"], kind            # eval numbers are in model-index, not only prose
    assert out["gguf_reply"].strip()


def test_the_auto_gguf_meets_its_budget_and_is_smaller_than_q4_k_m(demo_run):
    """Issue #14's goal on the embedded recipe: found automatically, measured by llama.cpp on held-out text, shown
    in the card with the command that rebuilds it."""
    work, _ = demo_run
    quality = json.loads((work / "run/gguf/quality.json").read_text())
    rows = {row["type"]: row for row in quality["files"]}
    assert quality["auto"]["meets"], quality["auto"]
    assert rows["AUTO"]["size"] < rows["Q4_K_M"]["size"]
    assert rows["AUTO"]["llama_cpp"]["same_top"] >= 0.90 and math.exp(rows["AUTO"]["llama_cpp"]["ln_ppl_ratio"]) <= 1.05
    assert rows["Q4_K_M"]["imatrix"] and rows["Q4_K_M"]["without_imatrix"]["mean_kld"] > 0
    text = (work / "run/card/gguf/README.md").read_text("utf-8")
    assert "gemma-3-270m-persian-chat-AUTO.gguf" in text and shlex.join(quality["auto"]["quantize_args"]) in text
    assert "Measured by llama.cpp itself" in text and "gemma-3-270m-persian-chat.imatrix" in text
