"""The package's structure, read from the source (ast): stages never import each other, nothing imports the CLI, the
local Hub stands apart, no module imports itself back through others (no circle, lazy imports included), and each
stage reads only the recipe sections it declares in `SECTIONS` (its cache key). Floors like models, scoring,
products and hubclient are where stages share code."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hubforge"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """hubforge modules that `name` imports anywhere in its source (top level or inside functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):  # importlib.import_module("hubforge.x") counts too
            found.add(node.args[0].value)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}
STAGE_MODULES = sorted(m for m in MODULES if m.startswith("hubforge.stages."))


def test_the_graph_sees_the_known_edges():
    assert "hubforge.models" in GRAPH["hubforge.stages.train"] and "hubforge.scoring" in GRAPH["hubforge.stages.gguf"]
    assert "hubforge.hubclient" in GRAPH["hubforge.pipeline"]


def test_no_stage_imports_another_stage():
    stages = {m for m in MODULES if m.startswith("hubforge.stages.")}
    wrong = {f"{m} -> {t}" for m in stages for t in GRAPH[m] if t in stages}
    assert not wrong, f"stages import stages (move the shared code to a floor module): {sorted(wrong)}"


def test_nothing_imports_the_cli_and_the_local_hub_stands_apart():
    assert not [m for m, targets in GRAPH.items() if "hubforge.cli" in targets]
    hub = {m for m in MODULES if m == "hubforge.hub" or m.startswith("hubforge.hub.")}
    # the local Hub may use the ground floor (modules that import nothing of hubforge, e.g. the bounded YAML loader
    # it shares with recipes), never the pipeline's modules
    ground = {m for m, targets in GRAPH.items() if not targets - {"hubforge"}}
    assert not {f"{m} -> {t}" for m in hub for t in GRAPH[m] if t not in hub | ground | {"hubforge"}}
    users = {m for m, targets in GRAPH.items() if m not in hub and targets & hub}
    assert users <= {"hubforge.cli", "hubforge.demo"}, users  # started by the CLI and the demo, reached over HTTP


def test_no_import_cycle():
    done, stack = set(), []

    def visit(node):
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for target in sorted(GRAPH[node]):
            visit(target)
        stack.pop()
        done.add(node)

    for name in sorted(GRAPH):
        visit(name)


def declared_sections(module: str) -> tuple[str, ...]:
    tree = ast.parse(MODULES[module].read_text("utf-8"))
    found = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
             and [getattr(t, "id", None) for t in n.targets] == ["SECTIONS"]]
    assert found, f"{module} declares no SECTIONS (the recipe sections its run reads) next to its run"
    return found[0]


def test_the_recipe_read_analysis_follows_recipe_into_floors():
    from recipe_reads import Index

    index = Index(PACKAGE)
    # gguf never names recipe.train itself: it reads train.assistant_only_loss through hubforge.scoring
    assert "train" in index.reads("hubforge.scoring", "scoring_template")
    assert "train" in index.reads("hubforge.stages.gguf", "run")
    assert index.reads("hubforge.products", "merge_skip_reason") == {"method", "export"}


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_each_stage_reads_only_the_recipe_sections_it_declares(module):
    from recipe_reads import Index

    reads = Index(PACKAGE).reads(module, "run")
    unknown = sorted(r for r in reads if r.startswith("?"))
    assert not unknown, f"{module}: cannot tell what these read of the recipe: {unknown}"
    undeclared = sorted(reads - set(declared_sections(module)))
    assert not undeclared, f"{module}.run reads recipe sections {undeclared} that its SECTIONS does not declare"
