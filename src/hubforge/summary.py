"""A run directory as Markdown for a CI job summary: stage states, the eval table, the GGUF quality table, and
(with `--compare-hub`) a release note: each card of this run against the README currently on the Hub.

    hubforge summary runs/<name>/<sha12> [--compare-hub] >> "$GITHUB_STEP_SUMMARY"

Reads only the run directory (manifest.json, evaluate/results.json, card/); the tables are the cards' own rows
(hubforge.cardtext), so the summary and the cards cannot disagree. The Hub is read anonymously or with whatever
token huggingface_hub finds; a repo that does not exist yet is a first publish, said as such.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _hub_readme(repo_id: str) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "README.md")).read_text("utf-8")
    except (RepositoryNotFoundError, EntryNotFoundError):
        return None


def release_note(run_dir: Path, manifest: dict) -> list[str]:
    """Per repo: 'first publish', 'card unchanged', or the unified diff of the published card against this run's."""
    card = (manifest["stages"].get("card") or {}).get("result") or {}
    lines = ["", "### Release note: cards against what the Hub serves now", ""]
    for kind, rel in sorted((card.get("cards") or {}).items()):
        repo_id = (card.get("repos") or {}).get(kind)
        if not repo_id:
            continue
        new = (run_dir / rel).read_text("utf-8")
        old = _hub_readme(repo_id)
        if old is None:
            lines.append(f"- `{repo_id}`: no card readable on the Hub (a first publish, or a private repo read without a token)")
        elif old == new:
            lines.append(f"- `{repo_id}`: card unchanged")
        else:
            diff = difflib.unified_diff(old.splitlines(), new.splitlines(), f"{repo_id} (published)", f"{repo_id} (this run)", lineterm="")
            lines += [f"<details><summary><code>{repo_id}</code>: card changes</summary>", "", "```diff", *diff, "```", "", "</details>"]
    return lines


def run_summary(run_dir: Path, compare_hub: bool = False) -> str:
    from hubforge.cardtext import eval_rows, quant_rows

    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text("utf-8"))
    stages = manifest.get("stages", {})
    out = [f"### `{run_dir}`", ""]
    out += _table(["stage", "status", "ended", "note"],
                  [[name, s.get("status", "?"), s.get("ended_at") or "", (s.get("error") or s.get("outdated_by") or (s.get("result") or {}).get("reason") or "")[:200]]
                   for name, s in stages.items()])
    results_file = run_dir / "evaluate" / "results.json"
    if results_file.is_file():
        kind = "merged" if (stages.get("merge") or {}).get("status") == "done" else "adapter"
        rows = eval_rows(kind, json.loads(results_file.read_text("utf-8")))
        out += ["", "#### Evaluation (base vs tuned)", ""]
        out += _table(["metric", "task", "split", "n", "base", "tuned", "Δ", ""],
                      [[r["metric"], r["task"], r["split"], r["n"], r["base"], r["tuned"], r["delta"], r["verdict"]] for r in rows])
    files = ((stages.get("gguf") or {}).get("result") or {}).get("files") or []
    if files:
        out += ["", "#### GGUF quality", ""]
        out += _table(["file", "type", "size", "bits/weight", "perplexity", "Δ vs F16", "KL", "top-1", "greedy", "tokens/s"],
                      [[q["file"] + q["flag"], q["type"], q["size"], q["bpw"], q["ppl"], q["delta"], q["kl"], q["top1"], q["agree"], q["tps"]]
                       for q in quant_rows(files)])
    if compare_hub:
        out += release_note(run_dir, manifest)
    return "\n".join(out) + "\n"
