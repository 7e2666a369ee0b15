"""lm-evaluation-harness (0.4.13) through its Python API: task lookup, local task folders, one call per task.

    from hubforge import lmeval
    manager = lmeval.task_manager(["my_task"], include_dir=lmeval.render_include_path(src, tmp))
    lm = lmeval.wrap(model, tokenizer, batch_size=4)
    raw = lmeval.run_task(lm, "my_task", manager, num_fewshot=0, limit=50, seed=42)

Local task YAMLs (`eval.lm_eval.include_path`) name their data with `dataset_kwargs.data_files`; lm-eval hands those
to `datasets`, which resolves relative paths against the current directory, not the YAML. So the folder is copied
to a temporary one in which every relative `data_files` path is made absolute against the YAML's own folder
(`!function` tags, `include:` files and helper modules keep working because the whole tree is copied).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
from pathlib import Path

import yaml

from hubforge.redact import redact

BOOTSTRAP_ITERS = 1000  # stderr estimates; lm-eval's default 100000 costs seconds per metric on CPU


class _Tagged(str):
    """A scalar with a YAML tag (`!function utils.process`) carried through load -> dump unchanged."""

    tag = "!function"


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_multi_constructor("!", lambda loader, suffix, node: _tagged(suffix, loader.construct_scalar(node)))
_Dumper.add_representer(_Tagged, lambda dumper, value: dumper.represent_scalar(value.tag, str(value)))


def _tagged(suffix: str, value: str) -> _Tagged:
    out = _Tagged(value)
    out.tag = f"!{suffix}"
    return out


def absolute_data_files(config: dict, folder: Path) -> bool:
    """Make `dataset_kwargs.data_files` (str, list or {split: str|list}) absolute against `folder`; True if changed."""
    kwargs = config.get("dataset_kwargs") if isinstance(config, dict) else None
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is None:
        return False

    def fix(value):
        if isinstance(value, str):
            return value if "://" in value or os.path.isabs(value) else str((folder / value).resolve())
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    fixed = fix(files)
    kwargs["data_files"] = fixed
    return fixed != files


def render_include_path(source: Path, dest: Path) -> Path:
    """Copy the task folder `source` to `dest` with every relative data_files path made absolute."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder of lm-eval task YAMLs")
    shutil.copytree(source, dest, dirs_exist_ok=True)
    for original in sorted(source.rglob("*.y*ml")):
        config = yaml.load(original.read_text("utf-8"), Loader=_Loader)
        if absolute_data_files(config, original.parent):
            target = dest / original.relative_to(source)
            target.write_text(yaml.dump(config, Dumper=_Dumper, allow_unicode=True, sort_keys=False), "utf-8")
    return dest


def task_manager(tasks: list[str], include_dir: Path | None = None):
    """A TaskManager that knows `tasks`; the built-in index (~15k tasks, +5 s) is read only when some task needs it."""
    from lm_eval.tasks import TaskManager

    if include_dir is not None:
        manager = TaskManager(include_path=str(include_dir), include_defaults=False)
        if not unknown_tasks(manager, tasks):
            return manager
    return TaskManager(include_path=str(include_dir) if include_dir else None, include_defaults=True)


def unknown_tasks(manager, tasks: list[str]) -> dict[str, list[str]]:
    """{unknown task: close known names}."""
    known = set(manager.all_tasks)
    return {t: difflib.get_close_matches(t, known, n=3) for t in tasks if t not in known}


def is_local(manager, task: str, include_dir: Path | None) -> bool:
    """The task is defined in the local include folder (so it needs no Hub access if its data is local)."""
    entry = manager.task_index.get(task)
    path = getattr(entry, "yaml_path", None)
    return bool(include_dir and path and Path(path).resolve().is_relative_to(Path(include_dir).resolve()))


@contextlib.contextmanager
def offline():
    """HF_HUB_OFFLINE=1 for huggingface_hub and datasets, which read it once at import: set the env and their flags."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for key, value in saved_env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def wrap(model, tokenizer, batch_size: int):
    """lm-eval's HF model class around an already loaded model (plain, merged, or PEFT), so nothing is loaded twice."""
    from lm_eval.models.huggingface import HFLM

    class VirtualTokensHFLM(HFLM):
        """Prompt/p-tuning PEFT models return logits for their virtual tokens too: keep the input positions only."""

        def _model_call(self, inps, *args, **kwargs):
            return super()._model_call(inps, *args, **kwargs)[:, -inps.shape[1]:]

    config = getattr(model, "active_peft_config", None)
    cls = VirtualTokensHFLM if config is not None and config.is_prompt_learning else HFLM
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_task(lm, task: str, manager, num_fewshot: int, limit: int | None, seed: int) -> dict:
    """lm-eval's results dict for one task (per-sample records left out)."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=manager, num_fewshot=num_fewshot, limit=limit,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
    )


def run_tasks(model, tokenizer, tasks: dict, recipe, key: str) -> tuple[dict, dict]:
    """Every eval.lm_eval task on one model, each on its own so that a failure is recorded and the others still run.
    `tasks`: {manager, include, offline} as the evaluate stage prepared them."""
    cfg, raw, results = recipe.eval.lm_eval, {}, {}
    lm = wrap(model, tokenizer, recipe.eval.batch_size)
    with offline() if tasks["offline"] else contextlib.nullcontext():
        for task in cfg.tasks:
            try:
                raw[task] = run_task(lm, task, tasks["manager"], cfg.num_fewshot, cfg.limit, recipe.train.seed)
                results[task] = {"status": "done", "error": None, **summarize(raw[task], task)}
            except Exception as exc:  # recorded as failed, never dropped
                print(f"[evaluate] lm-eval task {task!r} failed on {key}: {type(exc).__name__}: {exc}")
                results[task] = {"status": "failed", "error": redact(f"{type(exc).__name__}: {exc}")}
    return raw, results


def summarize(raw: dict, task: str) -> dict:
    """What results.json keeps of one task run: metrics, n, shots, version, split, decoding, task config."""
    config = (raw.get("configs") or {}).get(task) or {}
    n_samples = raw.get("n-samples") or {}
    metrics = {k: v for k, v in (raw.get("results") or {}).get(task, {}).items() if k != "alias"}
    subtasks = {name: {k: v for k, v in m.items() if k != "alias"} for name, m in (raw.get("results") or {}).items() if name != task}
    n = sum(int(s.get("effective", 0)) for s in n_samples.values()) if n_samples else None
    return {
        "metrics": metrics, "subtasks": subtasks, "n": n, "shots": (raw.get("n-shot") or {}).get(task),
        "version": (raw.get("versions") or {}).get(task), "split": config.get("test_split") or config.get("validation_split"),
        "decoding": config.get("generation_kwargs") if config.get("output_type") == "generate_until" else None,
        "task_config": config,
    }


def section(results: dict, raw: dict, recipe, offline_run: bool, out: Path, common: dict) -> dict:
    """The `lm_eval` section of results.json (see the schema); lm-eval's own results go to evaluate/lm_eval/<model>.json."""
    cfg = recipe.eval.lm_eval
    if not cfg.tasks:
        return {"status": "skipped", "reason": "eval.lm_eval.tasks is empty", **common}
    (out / "lm_eval").mkdir(exist_ok=True)
    from lm_eval.utils import handle_non_serializable

    files = {}
    for key, per_task in raw.items():
        files[key] = f"evaluate/lm_eval/{key}.json"
        (out / "lm_eval" / f"{key}.json").write_text(json.dumps(per_task, indent=2, default=handle_non_serializable), "utf-8")
    by_task = {}
    for task in cfg.tasks:
        per_model = {k: results[k][task] for k in results}
        done = next((r for r in per_model.values() if r["status"] == "done"), {})
        by_task[task] = {"status": "done" if all(r["status"] == "done" for r in per_model.values()) else "failed",
                         "version": done.get("version"), "shots": done.get("shots", cfg.num_fewshot), "limit": cfg.limit,
                         "n": done.get("n"), "split": done.get("split"), "decoding": done.get("decoding"),
                         "task_config": json.loads(json.dumps(done.get("task_config"), default=handle_non_serializable)),
                         "results": {k: {"status": r["status"], "error": r["error"],
                                         "metrics": {m: v for m, v in r.get("metrics", {}).items() if "," in m},
                                         "subtasks": r.get("subtasks", {})} for k, r in per_model.items()},
                         "higher_is_better": higher_is_better(raw, task)}
    failed = [t for t, r in by_task.items() if r["status"] == "failed"]
    return {"status": "failed" if failed else "done", "error": f"failed task(s): {', '.join(failed)}" if failed else None,
            "task": "lm_eval", "shots": cfg.num_fewshot, **common, "models": list(results),
            "lm_eval_version": version(), "offline": offline_run, "raw": files,
            "config": {**recipe.to_dict()["eval"]["lm_eval"], "bootstrap_iters": BOOTSTRAP_ITERS,
                       "batch_size": recipe.eval.batch_size}, "tasks": by_task}


def higher_is_better(raw: dict, task: str) -> dict:
    for per_task in raw.values():
        if task in per_task:
            return dict((per_task[task].get("higher_is_better") or {}).get(task, {}))
    return {}


def version() -> str:
    from importlib.metadata import version as dist_version

    return dist_version("lm-eval")
