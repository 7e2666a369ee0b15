"""Recipes: load a YAML file, apply `--set`/`--unset` overrides, validate, fill defaults, return a typed `Recipe`.

The JSON Schema in `schema/recipe.schema.json` is the single source of truth for fields, types, ranges, defaults
and order; the typed recipe (`recipe.train.lora.r`) is a set of frozen dataclasses generated from it at import
(hubforge.schematypes; `python -m hubforge.recipe --shape` prints them as source). Precedence: schema defaults < YAML < (`--standin`'s changes, then)
`--set a.b=c` / `--unset a.b` (an unset key falls back to its default, or is absent when it has none).

    from hubforge.recipe import load_recipe
    recipe = load_recipe("recipes/gemma-3-270m/persian-chat-lora.yaml", overrides=["train.max_steps=5"])

Every problem in a file is reported at once, each as `file:line:col: json.path: message`, in one
`RecipeError` (the CLI prints it and exits 1).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
from dataclasses import field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from hubforge import safeyaml, schematypes

EMBEDDED_BASES = ("embedded:gemma-3-270m",)
METHOD_SECTIONS = {"lora": ("lora", "qlora"), "quantization": ("qlora",), "prompt_tuning": ("prompt_tuning",),
                   "p_tuning": ("p_tuning",), "full": ("full",)}
ADAPTER_METHODS = ("lora", "qlora", "prompt_tuning", "p_tuning")
MERGEABLE_METHODS = ("lora", "qlora", "full")


class RecipeError(ValueError):
    """A recipe that cannot be used; `problems` holds one `file:line:col: path: message` line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


# ---------------------------------------------------------------- typed recipe (generated from the schema)
class RecipeMethods:
    """What the generated `Recipe` class can do besides holding the schema's fields."""

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what `recipe.resolved.yaml` holds and what is hashed); `standin` is
        absent unless this is a stand-in run."""
        return schematypes.plain(self)

    @property
    def sha256(self) -> str:
        return recipe_hash(self.to_dict())

    def section_hash(self, *sections: str) -> str:
        plain = self.to_dict()
        return recipe_hash({s: plain.get(s) for s in sections})

    def local_path(self, relative: str) -> Path:
        return (self.root / relative).resolve()


class MethodMethods:
    """What the generated `Method` class can say about its method."""

    @property
    def is_adapter(self) -> bool:
        return self.name in ADAPTER_METHODS

    @property
    def is_mergeable(self) -> bool:
        return self.name in MERGEABLE_METHODS


def recipe_classes(schema_dict: dict) -> dict[str, type]:
    """{name: frozen dataclass} for every object of a recipe schema (hubforge.schematypes explains the rules)."""
    return schematypes.build(schema_dict, "Recipe", behaviour={"Recipe": RecipeMethods, "Method": MethodMethods}, extra={
        # Not part of the schema: where the recipe came from, and the root that local paths are relative to.
        "Recipe": [("source", str, field(default="<memory>", compare=False)),
                   ("root", Path, field(default=Path("."), compare=False))]}, module=__name__)


_plain = schematypes.plain  # the name plan.py imports it by


def recipe_hash(plain: dict) -> str:
    canonical = json.dumps(plain, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- YAML with positions
class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `2e-5` as a float (YAML 1.1 would make it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.nan)$", re.X),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first at line {seen[key]})", mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _position(root_node: yaml.Node | None, path: list) -> str:
    """`line:col` of the deepest YAML node on `path` (1-based), or '' when the node is unknown."""
    node, best = root_node, root_node
    for part in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
        if node is None:
            break
        best = node
    return f"{best.start_mark.line + 1}:{best.start_mark.column + 1}" if best is not None else ""


def json_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


# ---------------------------------------------------------------- schema, defaults, overrides
@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(resources.files("hubforge").joinpath("schema/recipe.schema.json").read_text("utf-8"))


def method_names() -> list[str]:
    """The methods the schema knows (method.name's enum)."""
    return schema()["properties"]["method"]["properties"]["name"]["enum"]


# The typed recipe: one frozen dataclass per schema object (Recipe, Base, Data, Method, Lora, ..., Gguf), built here
# from the schema so that a key added there needs no Python edit. No file holds their source; to see them:
#     python -m hubforge.recipe --shape
CLASSES = recipe_classes(schema())
globals().update(CLASSES)
Recipe = CLASSES["Recipe"]  # bound by name too: the type every stage receives, for readers and linters


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (['train', 'learning_rate'], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError("--set", [f"--set {text!r}: expected section.key=value"])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError("--set", [f"--set {text!r}: empty key part in {key!r}"])
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError("--set", [f"--set {text!r}: value is not valid YAML ({exc.problem})"]) from None
    return parts, value


def apply_overrides(raw: dict, overrides: list[str], unset: list[str] = ()) -> dict:
    data = copy.deepcopy(raw)
    set_keys = {".".join(parse_override(text)[0]) for text in overrides}
    for key in unset:
        parts = key.strip().split(".")
        if key.strip() in set_keys:
            raise RecipeError("--unset", [f"--unset {key!r}: the same key is also given to --set; use one of them"])
        node = data
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            raise RecipeError("--unset", [f"--unset {key!r}: the recipe has no such key (section.key, as in the YAML)"])
        del node[parts[-1]]
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _fill_defaults(value: Any, node_schema: dict) -> Any:
    if not isinstance(value, dict) or node_schema.get("type") != "object":
        return value
    out = dict(value)
    for key, prop in node_schema.get("properties", {}).items():
        if key not in out and "default" in prop:
            out[key] = copy.deepcopy(prop["default"])
        if key in out:
            out[key] = _fill_defaults(out[key], prop)
    return out


def _schema_problems(data: Any, where) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema())
    problems = []
    for err in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(err.absolute_path)
        message = err.message
        if err.validator == "additionalProperties":
            allowed = list(err.schema.get("properties", {}))
            extras = [k for k in err.instance if k not in allowed]
            for extra in extras:
                hint = difflib.get_close_matches(str(extra), allowed, n=1)
                tip = f"; did you mean {hint[0]!r}?" if hint else f"; allowed: {', '.join(allowed)}"
                problems.append(where(path + [extra], f"unknown key {extra!r}{tip}"))
            continue
        if err.validator == "required":
            message = f"missing required field {err.message.split(' is a required')[0]}"
        elif err.validator == "pattern" and "x-hint" in err.schema:
            message = f"{err.instance!r} is not allowed: {err.schema['x-hint']}"
        elif err.validator == "enum":
            message = f"{err.instance!r} is not one of {', '.join(map(str, err.validator_value))}"
        problems.append(where(path, message))
    return problems


def _semantic_problems(data: dict, root: Path, where) -> list[str]:
    """Rules JSON Schema expresses badly: cross-field consistency, paths, repo ids, refused options."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problems = []
    base, dat, method = data.get("base", {}), data.get("data", {}), data.get("method", {})
    name = method.get("name")
    for section, owners in METHOD_SECTIONS.items():
        if section in method and name in method_names() and name not in owners:
            problems.append(where(["method", section], f"parameters for {' / '.join(owners)} do not belong to method {name!r}; remove them or change method.name"))
    if ("hub" in dat) == ("files" in dat):
        problems.append(where(["data"], "give exactly one of data.hub (a Hub dataset id) or data.files (local files)"))
    problems += [where(path, message) for path, message in path_problems(data, root)]
    if "files" in dat and (dat.get("revision") or dat.get("subset")):
        problems.append(where(["data", "revision"], "revision/subset apply only to data.hub"))
    model = base.get("model")
    if isinstance(model, str):
        if model.startswith("embedded:"):
            if model not in EMBEDDED_BASES:
                problems.append(where(["base", "model"], f"unknown embedded base {model!r}; known: {', '.join(EMBEDDED_BASES)}"))
        elif not is_local(model):
            try:
                validate_repo_id(model)
            except HFValidationError as exc:
                problems.append(where(["base", "model"], f"not a Hub repo id, local path (./...) or embedded:...: {exc}"))
    if "hub" in dat and isinstance(dat["hub"], str):
        try:
            validate_repo_id(dat["hub"])
        except HFValidationError as exc:
            problems.append(where(["data", "hub"], str(exc)))
    fmt = dat.get("format")
    train, ev, export = data.get("train", {}), data.get("eval", {}), data.get("export", {})
    if ev.get("qa") and fmt != "squad":
        problems.append(where(["eval", "qa"], f"QA metrics (EM/F1) need data.format: squad, not {fmt!r}"))
    if train.get("assistant_only_loss") and fmt == "text":
        problems.append(where(["train", "assistant_only_loss"], "plain-text data has no assistant turns; set it to false"))
    if export.get("merge_into", "auto") != "auto" and name != "qlora":
        problems.append(where(["export", "merge_into"], "only QLoRA adapters have a choice of merge target; remove it"))
    if (export.get("gguf") or {}).get("lora") and name not in ("lora", "qlora"):
        problems.append(where(["export", "gguf", "lora"], f"llama.cpp GGUF adapters exist only for LoRA/QLoRA, not {name!r}"))
    ns = (data.get("publish") or {}).get("namespace", "hubforge")
    for section, key in (("publish", "adapter_repo"), ("publish", "merged_repo"), ("publish", "gguf_repo"), ("space", "id")):
        repo = (data.get(section) or {}).get(key)
        if isinstance(repo, str):
            try:
                validate_repo_id(repo if "/" in repo else f"{ns}/{repo}")
            except HFValidationError as exc:
                problems.append(where([section, key], str(exc)))
    if isinstance(ns, str):
        try:
            validate_repo_id(f"{ns}/x")
        except HFValidationError:
            problems.append(where(["publish", "namespace"], f"{ns!r} is not a valid Hub user or organisation name"))
    return problems


# ---------------------------------------------------------------- local paths: one rule for every path field
# A field names a local path when the schema marks it `x-path`: "file" and "folder" must exist as such;
# "local-folder" (base.model) is a path only when it starts with "." or "/" and may be created later
# (`hubforge base fetch --to`). Every such path must resolve, symlinks followed, to somewhere inside the repository.
MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4096  # NAME_MAX and PATH_MAX of Linux file systems


def path_fields(node: dict | None = None, path: tuple = ()) -> list[tuple[tuple, str]]:
    """(field path, `*` for list items; kind) of every field the schema marks with `x-path`."""
    node = schema() if node is None else node
    found = [(path, node["x-path"])] if "x-path" in node else []
    for key, sub in node.get("properties", {}).items():
        found += path_fields(sub, path + (key,))
    if isinstance(node.get("items"), dict):
        found += path_fields(node["items"], path + ("*",))
    return found


def is_local(model: str) -> bool:
    """Whether base.model names a local folder (rather than a Hub repo id or an embedded base)."""
    return model.startswith((".", "/"))


def confine(root: Path, value: str) -> Path:
    """Where a recipe path really is (symlinks resolved); ValueError (the reason) unless that is inside `root`."""
    if "\0" in value:
        raise ValueError("contains a NUL byte")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ValueError(f"is longer than {MAX_PATH_BYTES} bytes")
    if long := next((p for p in value.split("/") if len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES), None):
        raise ValueError(f"has a name of {len(long.encode('utf-8', 'surrogatepass'))} bytes ({long[:16]}…); "
                         f"file and folder names are at most {MAX_NAME_BYTES} bytes")
    real_root = root.resolve()
    try:
        real = (root / value).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise ValueError(f"cannot be resolved ({exc})") from None
    if not real.is_relative_to(real_root):
        via = f" (a symlink leads to {real})" if real != Path(os.path.normpath(root.absolute() / value)) else ""
        raise ValueError(f"is outside the repository ({real_root}){via}; local paths must stay inside it")
    return real


def path_problems(data: dict, root: Path) -> list[tuple[list, str]]:
    """(field path, message) for every local path in recipe data that escapes `root` or is not what the field needs."""
    problems = []
    for pattern, kind in path_fields():
        for path, value in _values_at(data, pattern):
            if not isinstance(value, str) or (kind == "local-folder" and not is_local(value)):
                continue
            try:
                real = confine(root, value)
                exists = real.exists()  # raises (PermissionError) for a folder we may not enter
            except ValueError as exc:
                problems.append((path, f"{value[:80]!r} {exc}"))
                continue
            except OSError as exc:
                problems.append((path, f"{value!r} cannot be read ({exc.strerror})"))
                continue
            if kind in ("file", "folder") and not exists:
                problems.append((path, f"{value!r} does not exist under {root}"))
            elif (kind == "file" and not real.is_file()) or (kind == "folder" and not real.is_dir()):
                problems.append((path, f"{value!r} is not a {kind} (under {root})"))
    return problems


def _values_at(data: Any, pattern: tuple, path: tuple = ()):
    if not pattern:
        yield list(path), data
    elif pattern[0] == "*" and isinstance(data, list):
        for i, value in enumerate(data):
            yield from _values_at(value, pattern[1:], path + (i,))
    elif isinstance(data, dict) and pattern[0] in data:
        yield from _values_at(data[pattern[0]], pattern[1:], path + (pattern[0],))


def _find(value: Any, path: list, hit) -> list[list]:
    """Paths in recipe data whose key (or, for a leaf, value) makes `hit(key, value)` true; a hit is not searched further."""
    hits = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        hits += [path + [k]] if hit(k, v) else _find(v, path + [k], hit)
    return hits


def _find_trust_remote_code(value: Any, path: list) -> list[list]:
    return _find(value, path, lambda key, _: key == "trust_remote_code")


def _not_text(value: Any) -> list[list]:
    """Where a key or string holds a lone surrogate (YAML's "\\udcff" escape): not a character, cannot be UTF-8."""
    def bad(text) -> bool:
        return isinstance(text, str) and not text.isascii() and not _encodes(text)

    return [p[:-1] + ["(a key)"] if bad(p[-1]) else p for p in _find(value, [], lambda k, v: bad(k) or bad(v))]


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _derive(data: dict) -> dict:
    """Fill the values whose defaults depend on other fields, so the resolved recipe shows what runs."""
    ns, name = data["publish"]["namespace"], data["name"]
    pub = data["publish"]
    suffix = {"lora": "lora", "qlora": "lora", "prompt_tuning": "prompt-tuning", "p_tuning": "p-tuning"}.get(data["method"]["name"], "adapter")
    pub["adapter_repo"] = _qualify(pub["adapter_repo"] or f"{name}-{suffix}", ns)
    pub["merged_repo"] = _qualify(pub["merged_repo"] or name, ns)
    pub["gguf_repo"] = _qualify(pub["gguf_repo"] or f"{name}-GGUF", ns)
    space = data["space"]
    space["id"] = _qualify(space["id"] or f"{name}-demo", ns)
    space["title"] = space["title"] or name
    if space["rtl"] is None:
        space["rtl"] = any(lang in ("fa", "ar", "he", "ur", "ps", "ckb", "yi") for lang in data["card"]["languages"])
    if not data["eval"]["prompts"]:
        data["eval"]["prompts"] = list(space["examples"])
    method = data["method"]
    for section, owners in METHOD_SECTIONS.items():
        if method["name"] in owners:
            method[section] = _fill_defaults(method.get(section, {}), schema()["properties"]["method"]["properties"][section])
    return data


def _qualify(repo: str, namespace: str) -> str:
    return repo if "/" in repo else f"{namespace}/{repo}"


def project_root(recipe_path: Path) -> Path:
    """The repository that a recipe's local paths are relative to: the nearest folder with `.git` or `pyproject.toml`."""
    for folder in recipe_path.resolve().parents:
        if (folder / ".git").exists() or (folder / "pyproject.toml").exists():
            return folder
    return recipe_path.resolve().parent


def resolve(raw: Any, *, source: str = "<memory>", root: Path | None = None, overrides: list[str] = (),
            yaml_node: yaml.Node | None = None, unset: list[str] = (), standin: bool = False) -> Recipe:
    """Validate raw recipe data (+ overrides) and return the resolved, typed recipe; raise RecipeError listing all problems.

    `standin`: first apply hubforge.standin's changes (embedded base, shipped sample, small sizes), recorded in the
    resolved recipe's `standin:`; `overrides`/`unset` come after them."""
    root = (root or Path.cwd()).resolve()

    def where(path, message):
        pos = _position(yaml_node, path)
        return f"{source}:{pos}: {json_path(path)}: {message}" if pos else f"{source}: {json_path(path)}: {message}"

    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        raise RecipeError(source, [f"{source}: the recipe is {kind}; it must be a YAML mapping with at least name, base, data and method"])
    if standin:
        from hubforge import standin as standins

        try:
            stand_sets, stand_unset = standins.overrides(raw)
        except standins.StandinError as exc:
            raise RecipeError(source, [f"{source}: --standin: {exc}"]) from None
        raw = apply_overrides(raw, stand_sets, stand_unset)
        raw["standin"] = standins.record(stand_sets, stand_unset)
    data = apply_overrides(raw, list(overrides), list(unset))
    if broken := _not_text(data):  # before anything quotes these strings into messages, hashes or files
        raise RecipeError(source, [where(p, "holds a lone surrogate escape (\\ud800-\\udfff), which is not a character; "
                                            "write the character itself") for p in broken])
    refused = _find_trust_remote_code(data, [])
    problems = [where(p, "trust_remote_code is refused: hubforge never runs code shipped inside a model repo") for p in refused]
    for path in refused:  # reported once, not again as an unknown key
        node = data
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1])
    problems += _schema_problems(data, where)
    if not problems:
        problems += _semantic_problems(data, root, where)
    if problems:
        raise RecipeError(source, problems)
    resolved = _derive(_fill_defaults(data, schema()))
    if resolved["data"]["format"] == "text" and "assistant_only_loss" not in (raw.get("train") or {}):
        resolved["train"]["assistant_only_loss"] = False
    return _typed(resolved, source, root)


def _typed(d: dict, source: str, root: Path) -> Recipe:
    """The typed recipe of resolved data (nested sections built recursively, a method subsection absent from the
    data stays None, lists become tuples)."""
    return dataclasses.replace(schematypes.construct(Recipe, d), source=source, root=root)


def load_recipe(path: str | Path, overrides: list[str] = (), root: Path | None = None, unset: list[str] = (),
                standin: bool = False) -> Recipe:
    """Read and resolve one recipe file. Raises RecipeError with every problem found (file:line:col: path: message)."""
    path = Path(path)
    source = str(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise RecipeError(source, [f"{source}: cannot read: {exc.strerror}"]) from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = blob[: exc.start].count(b"\n") + 1
        raise RecipeError(source, [f"{source}:{line}: not UTF-8 (byte 0x{blob[exc.start]:02x} at offset {exc.start}); save the file as UTF-8"]) from None
    if not text.strip():
        raise RecipeError(source, [f"{source}: the file is empty; a recipe is a YAML mapping with at least name, base, data and method"])
    try:
        node, raw = safeyaml.load(text, _Loader, max_alias_cost=0)  # aliases refused before anything is built
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f"{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise RecipeError(source, [f"{source}:{pos}: malformed YAML: {exc.problem or exc.context}"]) from None
    return resolve(raw, source=source, root=root or project_root(path), overrides=overrides, yaml_node=node,
                   unset=unset, standin=standin)


def find_recipes(paths: list[str | Path]) -> list[Path]:
    """Files and folders (searched recursively for *.yaml / *.yml) -> recipe files, sorted. A `data/` folder inside
    a searched folder holds shipped datasets and their lm-eval task files, not recipes (as `hubforge changed` sees it)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix in (".yaml", ".yml") and q.is_file()
                            and "data" not in q.relative_to(p).parts[:-1])
        else:
            found.append(p)
    return found


def read_resolved(path: str | Path) -> Recipe:
    """The typed recipe a run directory saved (`recipe.resolved.yaml`, every default already filled in)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
        return _typed(data, str(path), path.parent)
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise RecipeError(str(path), [f"{path}: not a resolved recipe written by hubforge ({type(exc).__name__}: {exc})"]) from None


def dump_resolved(recipe: Recipe) -> str:
    header = f"# Resolved recipe (all defaults filled in) from {recipe.source}\n# sha256: {recipe.sha256}\n"
    return header + yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True, width=120)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--shape"]:
        raise SystemExit("usage: python -m hubforge.recipe --shape   (prints the typed recipe's classes)")
    print(schematypes.shape(CLASSES, "src/hubforge/schema/recipe.schema.json"))
