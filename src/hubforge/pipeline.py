"""The stage registry and the loop that runs stages through a run directory.

A stage is one module in `hubforge.stages` with an entry function `run(recipe, run_dir) -> dict` and, beside it,
`SECTIONS`: the recipe sections it reads. It reads those and the outputs of the stages it needs (from `run_dir`),
imports only the floors below it (never another stage), writes only into
`run_dir.stage_dir(<its name>)`, and returns a JSON-able result that lands in the manifest. A stage that has
nothing to do for a recipe (e.g. `merge` for prompt tuning) returns `{"status": "not_applicable", "reason": ...}`.

Adding a stage is one entry in `STAGES`. A stage is skipped when it finished before with the same inputs
(the recipe sections it reads + the outputs of the stages it needs) and its outputs are still on disk;
otherwise it runs again, and a stage that crashed or was killed is re-run. Publishing stages are the exception:
they always run (idempotently), since what they change lives outside the run directory. The Hub they talk to
(HF_ENDPOINT) is one of their inputs: each entry records its endpoint, a result from another Hub is kept under
`earlier`, and a publishing stage built on one that ran again elsewhere shows `outdated` until it runs there too.

    hubforge run recipes/gemma-3-270m/persian-chat-lora.yaml --stages data,train
"""
from __future__ import annotations

import hashlib
import importlib
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hubforge import chat, hubclient, versions
from hubforge.errors import StageError
from hubforge.recipe import Recipe, dump_resolved
from hubforge.redact import redact
from hubforge.rundir import RunDir, now, stage_host_fields

# Bump when a stage's code changes in a way that should invalidate earlier outputs.
STAGE_CODE_VERSION = "1"


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    summary: str
    module_path: str = ""  # default hubforge.stages.<name>; tests point it elsewhere
    publishes: bool = False  # has Hub side effects: runs only when publishing was asked for

    @property
    def module(self) -> str:
        return self.module_path or f"hubforge.stages.{self.name}"

    def entry(self) -> Callable[[Recipe, RunDir], dict]:
        return importlib.import_module(self.module).run

    @property
    def sections(self) -> tuple[str, ...]:
        """The recipe sections the stage reads, declared next to its `run` (imported on use: plan stays light)."""
        return importlib.import_module(self.module).SECTIONS


STAGES: tuple[Stage, ...] = (
    Stage("data", (), "load, format and split the dataset; fingerprint it"),
    Stage("train", ("data",), "fine-tune with TRL SFTTrainer + PEFT (resumable)"),
    Stage("merge", ("train",), "merge the adapter into a 16-bit base and verify it"),
    Stage("evaluate", ("data", "train", "merge"), "base vs tuned: loss, perplexity, QA, samples, lm-eval"),
    Stage("gguf", ("merge", "train"), "GGUF f16 + llama.cpp quants, each verified"),
    Stage("card", ("data", "train", "merge", "evaluate", "gguf"), "render and validate model cards"),
    Stage("publish", ("train", "merge", "gguf", "card"), "push adapter, merged and GGUF repos", publishes=True),
    Stage("space", ("publish",), "deploy the Gradio Space and wait for RUNNING", publishes=True),
)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise StageError(f"unknown stage {name!r}; stages are: {', '.join(s.name for s in STAGES)}")


def select_stages(names: list[str] | None, publish: bool = False) -> list[Stage]:
    """The stages to run, in pipeline order. Without `publish`, stages with Hub side effects are left out."""
    if not names:
        return [s for s in STAGES if publish or not s.publishes]
    chosen = [get_stage(n) for n in names]
    order = [s.name for s in STAGES]
    return sorted(chosen, key=lambda s: order.index(s.name))


def inputs_hash(stage: Stage, recipe: Recipe, run_dir: RunDir) -> str:
    parts = {
        "stage": stage.name,
        "code": STAGE_CODE_VERSION,
        "recipe": recipe.section_hash(*stage.sections),
        "upstream": {n: run_dir.outputs_hash(n) for n in stage.needs},
    }
    if stage.publishes:  # what it changes lives on that Hub: another Hub is another input
        parts["endpoint"] = hubclient.endpoint()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def dependants(name: str) -> list[Stage]:
    """The stages built on `name`, directly or through others, in pipeline order."""
    found = {name}
    for stage in STAGES:  # STAGES is in dependency order, so one pass finds every descendant
        if found & set(stage.needs):
            found.add(stage.name)
    return [s for s in STAGES if s.name in found - {name}]


def start(stage: Stage, run_dir: RunDir, digest: str) -> None:
    """Mark `stage` running. For a stage with Hub side effects, what it did before is history from now on: its last
    result moves to `earlier[<endpoint>]` (so every Hub it published to stays on record), and when its inputs
    changed (another Hub, other files), the publishing stages built on it no longer show `done` for it."""
    fields = {"status": "running", "started_at": now(), "ended_at": None, "inputs_hash": digest, "error": None,
              **stage_host_fields()}
    entry = run_dir.manifest["stages"].get(stage.name, {})
    if entry.get("outdated_by"):
        fields["outdated_by"] = None
    if stage.publishes:
        fields["endpoint"] = hubclient.endpoint()
        if entry.get("result"):
            earlier = dict(entry.get("earlier") or {})
            where = entry.get("endpoint") or entry["result"].get("endpoint") or "unknown"
            earlier[where] = {"ended_at": entry.get("ended_at"), "status": entry.get("status"), "result": entry["result"]}
            fields.update(earlier=earlier, result={})
        if entry.get("inputs_hash") not in (None, digest):
            for later in dependants(stage.name):
                state = run_dir.manifest["stages"].get(later.name, {}).get("status")
                if later.publishes and state in ("done", "not_applicable"):
                    run_dir.mark(later.name, status="outdated",
                                 outdated_by=f"{stage.name} ran again with other inputs (Hub {fields['endpoint']})")
    run_dir.mark(stage.name, **fields)


def _save_resolved(recipe: Recipe, run_dir: RunDir) -> None:
    path = run_dir.path / "recipe.resolved.yaml"
    text = dump_resolved(recipe)
    if path.exists() and path.read_text("utf-8") != text:
        old = path.read_text("utf-8").split("# sha256: ", 1)[-1][:12]
        path.rename(run_dir.path / f"recipe.resolved.{old}.yaml")  # keep what earlier stages ran with
    path.write_text(text, "utf-8")


def default_run_dir(recipe: Recipe, runs_root: Path = Path("runs")) -> Path:
    """Same recipe -> same directory, so re-running resumes; a changed recipe starts a new one."""
    return runs_root / recipe.name / recipe.sha256[:12]


def preflight(recipe: Recipe, selected: list[Stage]) -> None:
    """Checks that must pass before any expensive stage: a chat template training will accept (when training),
    Hub credentials and names (when publishing)."""
    if any(s.name == "train" for s in selected) and (problem := chat.recipe_template_problem(recipe)):
        raise StageError(f"{recipe.source}: {problem}")
    if any(s.publishes for s in selected):
        if recipe.standin:
            raise StageError(f"{recipe.source}: a stand-in run (standin: in the resolved recipe: embedded base, sample "
                             "data) is never published; run the recipe without --standin to publish")
        hubclient.preflight(recipe)


def run(recipe: Recipe, run_dir: RunDir, stages: list[str] | None = None, force: bool = False,
        echo: Callable[[str], None] = print, publish: bool = False,
        options: dict[str, dict] | None = None) -> dict[str, dict]:
    """Run the selected stages in order; returns {stage: manifest entry}. Raises on the first failing stage.

    `publish=True` adds the stages with Hub side effects (publish, space) and runs their preflight first, so a
    bad token or namespace stops the run before training. `options` are keyword arguments for a stage's entry
    function that are not recipe data (e.g. {"space": {"timeout": 60}} from `hubforge space deploy --timeout`).
    """
    versions.check()
    selected = select_stages(stages, publish)
    preflight(recipe, selected)
    lock = run_dir.lock()
    try:
        _save_resolved(recipe, run_dir)
        run_dir.record_provenance(recipe.sha256, recipe.source, recipe.root)
        selected_names = {s.name for s in selected}
        for stage in selected:
            for need in stage.needs:
                state = run_dir.stage(need)["status"]
                if need not in selected_names and state not in ("done", "not_applicable"):
                    raise StageError(f"stage {stage.name!r} needs {need!r}, which is {state} in {run_dir.path}; "
                                     f"add it to --stages or run without --stages")
            digest = inputs_hash(stage, recipe, run_dir)
            entry = run_dir.stage(stage.name)
            # Stages with Hub side effects always run: the remote can change under an unchanged run directory
            # (another endpoint, a deleted repo), and re-publishing unchanged files makes no commit and sends no bytes.
            if (not force and not stage.publishes and entry.get("status") in ("done", "not_applicable")
                    and entry.get("inputs_hash") == digest and run_dir.outputs_intact(stage.name)):
                echo(f"[{stage.name}] up to date, skipped")
                continue
            if entry.get("status") == "interrupted":
                echo(f"[{stage.name}] previous attempt was interrupted; running it again")
            echo(f"[{stage.name}] {stage.summary}")
            started = time.time()
            start(stage, run_dir, digest)
            try:
                result = stage.entry()(recipe, run_dir, **(options or {}).get(stage.name, {})) or {}
            except BaseException as exc:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                run_dir.mark(stage.name, status=status, ended_at=now(), error=redact(f"{type(exc).__name__}: {exc}"),
                             traceback=redact(traceback.format_exc(limit=8)))
                raise
            status = "not_applicable" if result.get("status") == "not_applicable" else "done"
            run_dir.mark(stage.name, status=status, ended_at=now(), seconds=round(time.time() - started, 2),
                         outputs=run_dir.describe_outputs(stage.name), result=json.loads(redact(json.dumps(result))))
            echo(f"[{stage.name}] {status} in {time.time() - started:.1f}s" + (f": {result.get('reason')}" if status == "not_applicable" else ""))
        return {s.name: run_dir.stage(s.name) for s in selected}
    finally:
        lock.close()
