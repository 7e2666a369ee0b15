"""The offline demo: a local Hub, the whole pipeline with publishing, and the Space running on that Hub.

    hubforge demo recipes/gemma-3-270m/persian-chat-lora.yaml      (what `make demo` runs)

The Hub is unreachable from the machines hubforge is developed on, so the demo starts hubforge's own local Hub
(the same HTTP protocol; the unmodified huggingface_hub client talks to it), publishes the three repos there and
deploys the Space, which the local Hub runs. `huggingface_hub` reads HF_ENDPOINT and HF_HUB_DISABLE_XET when it
is imported, so both are set here before anything imports it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def point_client_at_local_hub(port: int) -> None:
    if "huggingface_hub" in sys.modules and os.environ.get("HF_ENDPOINT") != f"http://127.0.0.1:{port}":
        raise RuntimeError("huggingface_hub was imported before the local Hub's endpoint was set; start the demo in a fresh process")
    os.environ.update({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "GRADIO_ANALYTICS_ENABLED": "False"})
    os.environ.pop("HF_HUB_OFFLINE", None)


def run_demo(recipe_path: Path, data_dir: Path, overrides: list[str], keep_serving: bool,
             echo: Callable[[str], None] = print, run_dir: Path | None = None) -> dict:
    port = free_port()
    point_client_at_local_hub(port)
    from hubforge import pipeline
    from hubforge.hub import serve
    from hubforge.recipe import load_recipe
    from hubforge.rundir import RunDir
    from hubforge.space_runner import attach

    hub = serve(data_dir, port=port)
    try:
        os.environ["HF_TOKEN"] = hub.token_path.read_text("utf-8").strip()
        attach(hub)  # the local Hub runs the Space's app once it is deployed
        recipe = load_recipe(recipe_path, overrides)
        folder = run_dir or pipeline.default_run_dir(recipe)
        echo(f"local Hub: {hub.endpoint} (data in {data_dir})\nrun directory: {folder}")
        pipeline.run(recipe, RunDir.open(folder), echo=echo, publish=True)
        summary = summarize(RunDir.open(folder), hub.endpoint)
        echo(render_summary(summary))
        if keep_serving:
            echo("The local Hub and the Space keep running; press Ctrl-C to stop.")
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
        return summary
    finally:
        hub.stop()


def summarize(run_dir, endpoint: str) -> dict:
    stages = run_dir.manifest["stages"]
    result = lambda name: stages.get(name, {}).get("result", {})  # noqa: E731
    evaluation = run_dir.path / "evaluate" / "results.json"
    return {
        "run_dir": str(run_dir.path),
        "statuses": {name: entry.get("status") for name, entry in stages.items()},
        "train": {k: result("train").get(k) for k in ("steps", "tokens_seen", "train_loss", "seconds")},
        "evaluation": json.loads(evaluation.read_text("utf-8")) if evaluation.is_file() else None,
        "repos": {kind: f"{endpoint}/{info['repo_id']}" for kind, info in (result("publish").get("repos") or {}).items()},
        "space": result("space"),
    }


def render_summary(summary: dict) -> str:
    lines = ["", "== hubforge demo ==", f"run directory: {summary['run_dir']}"]
    lines += [f"  {name:9} {status}" for name, status in summary["statuses"].items()]
    train = summary["train"]
    if train.get("steps"):
        lines.append(f"trained {train['steps']} steps on {train['tokens_seen']} tokens in {train['seconds']} s, final loss {train['train_loss']}")
    for kind, url in summary["repos"].items():
        lines.append(f"{kind:8} repo: {url}")
    if summary["space"]:
        space = summary["space"]
        lines.append(f"Space {space.get('space_id')}: {space.get('stage')}; page {space.get('url')}, app {space.get('app_url')}")
    return "\n".join(lines)
