"""Frozen dataclasses generated from a JSON Schema, so that one file (the schema) defines a typed config's shape.

Every object in the schema becomes a class whose fields are exactly the object's `properties`, in the schema's
order (which is also the order `plain()` writes them back in). The class is named by the object's `x-class`, else
by its property name in CamelCase (`p_tuning` -> `PTuning`); `"x-class": "dict"` keeps an object a plain mapping.
Two objects that would get one name are refused at import, naming both. A property that is neither required nor
has a `default` may be absent from the data: its field then holds `None`, or the property's `x-absent` value (e.g.
`[]`, as a tuple), and `plain()` leaves it out while it holds that. Lists become tuples (the classes are frozen); fields are keyword-only.

Annotations come from the JSON types (`string` -> str, `["integer", "null"]` -> int | None, an enum -> Literal[...],
an array -> tuple[item, ...]); nothing checks them at run time (the schema validator does that), they are there
for readers: `shape(classes)` prints the classes as source (`python -m hubforge.recipe --shape`).

    classes = build(schema_dict, "Recipe", behaviour={"Recipe": RecipeMethods})
    recipe = construct(classes["Recipe"], resolved_dict)
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

JSON_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "object": dict, "null": type(None)}
SCHEMA_FIELD = "schema"  # field metadata: False on fields a caller adds that are not in the schema


def class_name(key: str, node: dict) -> str:
    """The class an object node becomes: its `x-class`, else its property name in CamelCase."""
    return node.get("x-class") or "".join(part[:1].upper() + part[1:] for part in key.split("_"))


def build(schema: dict, root: str, *, behaviour: dict[str, type] | None = None,
          extra: dict[str, list[tuple]] | None = None, module: str = __name__) -> dict[str, type]:
    """{class name: frozen dataclass} for every object in `schema`, the top level named `root`, inner classes
    first. `behaviour[name]` is a base class carrying methods; `extra[name]` lists (name, type, dataclasses.field)
    of fields that are not in the schema (they get metadata {"schema": False})."""
    classes: dict[str, type] = {}
    where: dict[str, str] = {}

    def make(name: str, node: dict, path: str) -> type:
        if name in where:
            raise ValueError(f"schema objects {where[name]} and {path or '(top level)'} both become class {name!r}; "
                             f"give one of them an \"x-class\" with another name")
        where[name] = path or "(top level)"
        required = set(node.get("required", ()))
        fields = []
        for key, prop in node.get("properties", {}).items():
            tp, nested = annotation(key, prop, lambda k, p: make(class_name(k, p), p, f"{path}.{k}" if path else k))
            spec = dataclasses.field(metadata={SCHEMA_FIELD: True, "class": nested})
            if key not in required and "default" not in prop:  # may be absent: None, or its `x-absent`, when unset
                absent = prop.get("x-absent")
                absent = tuple(absent) if isinstance(absent, list) else absent
                tp = tp if absent is not None else tp | None
                spec = dataclasses.field(default=absent, metadata={SCHEMA_FIELD: True, "class": nested})
            fields.append((key, tp, spec))
        for key, tp, spec in (extra or {}).get(name, ()):
            fields.append((key, tp, dataclasses.field(default=spec.default, default_factory=spec.default_factory,
                                                      compare=spec.compare, metadata={SCHEMA_FIELD: False})))
        bases = (behaviour[name],) if behaviour and name in behaviour else ()
        cls = dataclasses.make_dataclass(name, fields, bases=bases, frozen=True, kw_only=True,
                                         namespace={"__doc__": node.get("description") or f"Schema object `{path}`."})
        cls.__module__ = module  # found again by pickle and by readers as <module>.<name>
        classes[name] = cls
        return cls

    make(root, schema, "")
    unknown = set(behaviour or ()) - set(classes) | set(extra or ()) - set(classes)
    if unknown:
        raise ValueError(f"no schema object becomes class {', '.join(sorted(unknown))}")
    return classes


def _types(prop: dict) -> list[str]:
    kind = prop.get("type", [])
    return kind if isinstance(kind, list) else [kind]


def annotation(key: str, prop: dict, make_class) -> tuple[Any, type | None]:
    """(annotation of a property, the dataclass its values are built as or None)."""
    if "object" in _types(prop) and class_name(key, prop) != "dict":
        cls = make_class(key, prop)
        return cls, cls
    if "enum" in prop:
        values = tuple(v for v in prop["enum"] if v is not None)
        tp = Literal[values]
        return (tp | None if None in prop["enum"] else tp), None
    if "array" in _types(prop):
        items = prop.get("items") or {}
        item = dict if "object" in _types(items) else annotation(key, items, make_class)[0] if items else Any
        return tuple[item, ...], None  # items stay plain data: construct() makes the list a tuple, nothing deeper
    tps = [JSON_TYPES[t] for t in _types(prop)]
    return (typing.Union[tuple(tps)] if tps else Any), None


def construct(cls: type, values: dict):
    """An instance of a generated class from plain data: nested objects built recursively, lists made tuples.
    Keys the class does not know are ignored; a missing field without a default raises TypeError."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values or not f.metadata.get(SCHEMA_FIELD):
            continue
        value = values[f.name]
        if f.metadata.get("class") and isinstance(value, dict):
            value = construct(f.metadata["class"], value)
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def plain(value: Any) -> Any:
    """Plain data of an instance (schema fields only, in schema order; an optional field left unset is omitted)."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.metadata.get(SCHEMA_FIELD, True)
                and (f.default is dataclasses.MISSING or getattr(value, f.name) != f.default)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- for readers
def type_text(tp: Any) -> str:
    """An annotation as it would be written in source: `tuple[str, ...]`, `Literal['a', 'b'] | None`, `Lora | None`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is tuple:
        return f"tuple[{type_text(args[0])}, ...]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", repr(tp))


def shape(classes: dict[str, type], source: str) -> str:
    """The generated classes as Python source, for readers (they are built at import, so no file holds them)."""
    out = [f"# Generated at import from {source}; edit the schema, not this listing.", ""]
    for name, cls in classes.items():
        bases = [b.__name__ for b in cls.__bases__ if b is not object]
        out += ["@dataclass(frozen=True, kw_only=True)", f"class {name}{'(' + ', '.join(bases) + ')' if bases else ''}:"]
        doc = (cls.__doc__ or "").strip()
        out += [f'    """{doc}"""'] if doc else []
        for f in dataclasses.fields(cls):
            default = "" if f.default is dataclasses.MISSING else f" = {f.default!r}"
            if not f.metadata.get(SCHEMA_FIELD):
                default = f" = field(default={f.default!r}, compare={f.compare})  # not in the schema"
            out.append(f"    {f.name}: {type_text(f.type)}{default}")
        out.append("")
    return "\n".join(out)
