"""The typed recipe is generated from the JSON Schema (hubforge.schematypes): one class per schema object with
exactly its properties, a key added to the schema is an attribute with no Python edit, the classes are frozen and
compare by value, and every shipped recipe's typed values are the resolved data's."""
from __future__ import annotations

import ast
import copy
import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from hubforge import recipe as R
from hubforge import schematypes
from hubforge.recipe import find_recipes, load_recipe, resolve

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
SHIPPED = find_recipes([REPO / "recipes"])
MINIMAL = {"name": "mm", "base": {"model": "embedded:gemma-3-270m"}, "method": {"name": "lora"},
           "data": {"files": ["recipes/data/persian-chat.jsonl"], "format": "messages"}}


def schema_objects(node: dict, key: str = "", path: str = "") -> list[tuple[str, dict]]:
    """(path, node) of every object in the schema that becomes a class (not those marked `"x-class": "dict"`)."""
    if node.get("type") != "object" or schematypes.class_name(key, node) == "dict":
        return []
    found = [(path, node)]
    for k, sub in node.get("properties", {}).items():
        found += schema_objects(sub, k, f"{path}.{k}" if path else k)
    return found


def schema_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get(schematypes.SCHEMA_FIELD)]


def test_every_schema_object_is_a_class_with_exactly_its_properties_in_order():
    objects = schema_objects(R.schema())
    assert len(objects) == len(R.CLASSES) >= 17
    for path, node in objects:
        cls = R.CLASSES["Recipe" if not path else schematypes.class_name(path.rsplit(".", 1)[-1], node)]
        assert schema_fields(cls) == list(node["properties"]), path
        assert getattr(R, cls.__name__) is cls and cls.__module__ == "hubforge.recipe"
    # the names every caller uses
    for name in ("Recipe", "Base", "Data", "Method", "Lora", "Quantization", "PromptTuning", "PTuning", "Full", "Train",
                 "Compute", "Eval", "LmEval", "Export", "Gguf", "Card", "Publish", "Space"):
        assert dataclasses.is_dataclass(getattr(R, name)), name
    assert R.Recipe is R.CLASSES["Recipe"]
    assert R.schema()["properties"]["data"]["properties"]["columns"]["x-class"] == "dict"  # a mapping stays a dict


def with_new_keys() -> dict:
    """The shipped schema plus a scalar, a list and an object under export.gguf, as a later feature would add them."""
    schema = copy.deepcopy(R.schema())
    gguf = schema["properties"]["export"]["properties"]["gguf"]["properties"]
    gguf["imatrix_probe"] = {"type": ["string", "null"], "default": None}
    gguf["extra_types"] = {"type": "array", "items": {"type": "string"}, "default": ["Q3_K_M"]}
    gguf["split_probe"] = {"type": "object", "additionalProperties": False, "default": {},
                           "properties": {"above_gb": {"type": "number", "default": 50}}}
    return schema


def test_a_key_added_to_the_schema_is_an_attribute_without_a_code_change(monkeypatch):
    schema = with_new_keys()
    classes = R.recipe_classes(schema)
    assert schema_fields(classes["Gguf"])[-3:] == ["imatrix_probe", "extra_types", "split_probe"]
    assert schema_fields(classes["SplitProbe"]) == ["above_gb"]
    # the whole path, validation included: resolve against the modified schema
    monkeypatch.setattr(R, "schema", lambda: schema)
    monkeypatch.setattr(R, "Recipe", classes["Recipe"])
    default = resolve(copy.deepcopy(MINIMAL), root=REPO)
    assert default.export.gguf.imatrix_probe is None and default.export.gguf.extra_types == ("Q3_K_M",)
    assert default.export.gguf.split_probe == classes["SplitProbe"](above_gb=50)
    raw = copy.deepcopy(MINIMAL) | {"export": {"gguf": {"imatrix_probe": "x.dat", "split_probe": {"above_gb": 2}}}}
    chosen = resolve(raw, root=REPO)
    assert (chosen.export.gguf.imatrix_probe, chosen.export.gguf.split_probe.above_gb) == ("x.dat", 2)
    assert chosen.to_dict()["export"]["gguf"]["split_probe"] == {"above_gb": 2} and chosen.sha256 != default.sha256
    assert chosen.method.is_adapter and chosen.method.lora.r == 8  # behaviour and the other sections unchanged


def test_two_objects_that_would_share_a_class_name_are_refused_unless_one_is_named():
    schema = copy.deepcopy(R.schema())
    schema["properties"]["space"]["properties"]["data"] = {"type": "object", "properties": {"x": {"type": "string"}}}
    with pytest.raises(ValueError, match=r"schema objects data and space.data both become class 'Data'.*x-class"):
        R.recipe_classes(schema)
    schema["properties"]["space"]["properties"]["data"]["x-class"] = "SpaceData"
    assert schema_fields(R.recipe_classes(schema)["SpaceData"]) == ["x"]


def test_typed_recipes_are_frozen_and_compare_by_value():
    path = REPO / "recipes/gemma-3-270m/persian-chat-lora.yaml"
    a, b = load_recipe(path), load_recipe(path)
    for obj, attr in ((a, "name"), (a.train, "seed"), (a.method.lora, "r"), (a.export.gguf, "quants")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, None)
    assert a == b and a is not b and a.train == b.train and a.export.gguf == b.export.gguf
    assert dataclasses.replace(a, source="elsewhere", root=Path("/")) == a  # where it came from is not its value
    changed = dataclasses.replace(a, train=dataclasses.replace(a.train, seed=7))
    assert changed != a and changed.train.seed == 7 and a.train.seed != 7
    assert pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(TypeError):
        R.Lora(8, 16, 0.0, ("q_proj",), "none", False, ())  # keyword-only: a reordered schema cannot shift values


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shipped_recipe_reads_the_values_of_its_resolved_data(path, monkeypatch):
    seen = []
    typed = R._typed
    monkeypatch.setattr(R, "_typed", lambda d, source, root: seen.append(copy.deepcopy(d)) or typed(d, source, root))
    recipe = load_recipe(path)
    (resolved,) = seen

    def same(obj, data: dict, where: str):
        for f in dataclasses.fields(obj):
            if not f.metadata.get(schematypes.SCHEMA_FIELD):
                continue
            value = getattr(obj, f.name)
            if f.name not in data:
                assert value == f.default, f"{where}.{f.name}: absent from the data but {value!r}"
            elif dataclasses.is_dataclass(value):
                same(value, data[f.name], f"{where}.{f.name}")
            else:
                expected = tuple(data[f.name]) if isinstance(data[f.name], list) else data[f.name]
                assert value == expected and type(value) is type(expected), f"{where}.{f.name}"
        assert set(data) <= {f.name for f in dataclasses.fields(obj)}, where

    same(recipe, resolved, path.name)
    assert recipe.to_dict() == resolved  # and back: what is hashed and saved is the resolved data, order included
    assert list(recipe.to_dict()) == list(R.schema()["properties"])[:len(recipe.to_dict())]


def test_the_shape_can_be_read_as_source():
    out = subprocess.run([sys.executable, "-m", "hubforge.recipe", "--shape"], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": ""}).stdout
    tree = ast.parse(out)
    classes = {n.name: [a.target.id for a in n.body if isinstance(a, ast.AnnAssign)] for n in tree.body
               if isinstance(n, ast.ClassDef)}
    assert classes == {name: [f.name for f in dataclasses.fields(cls)] for name, cls in R.CLASSES.items()}
    assert "    quants: tuple[Literal['Q8_0', " in out and "    lora: Lora | None = None" in out
    assert "class Method(MethodMethods):" in out and "class Recipe(RecipeMethods):" in out
