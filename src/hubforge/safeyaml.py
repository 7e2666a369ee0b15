"""YAML with a bounded cost: aliases, nesting and odd scalars cannot make a small document expensive to load.

A YAML alias (`*x`) repeats the node its anchor (`&x`) names; nine nested levels of ten aliases each turn 2 KB
of text into 10^9 nodes ("billion laughs"). PyYAML composes such a document cheaply (an alias is the *same*
node object, so the graph stays as small as the text) but constructing it, walking it or printing it costs the
full expansion. So the budget is checked *while composing*, before anything is constructed: every node's
expanded cost (1 + the length of a scalar, or 1 + its children's costs) is known once the node is composed,
an alias adds its target's cost to a running total, and the document is refused as soon as that total passes
`max_alias_cost`. Time and memory are linear in the text, whatever the expansion would have been.

    from hubforge.safeyaml import load, BoundedYAMLError
    node, data = load(text, loader=MyLoader, max_alias_cost=0)      # recipes: no aliases at all
    node, data = load(text, max_alias_cost=10_000)                  # README front matter on the local Hub

Used by `hubforge.recipe.load_recipe` (recipes are data written by people for people to review: an alias hides
what runs, so recipes refuse aliases outright; anchors alone are harmless) and by the local Hub's card parser
(model cards in the wild occasionally use aliases, so a small budget). Also refused: recursive aliases, nesting
deeper than `max_depth` (PyYAML's composer recurses; 10^5 `[` would otherwise raise RecursionError), and
scalars Python cannot convert (an int of more than 4300 digits raises ValueError in the constructor).
Every refusal is a `BoundedYAMLError`, a `yaml.MarkedYAMLError`, so it carries the line and column to fix.
"""
from __future__ import annotations

import yaml

__all__ = ["BoundedYAMLError", "load", "DEFAULT_ALIAS_COST", "DEFAULT_MAX_DEPTH"]

DEFAULT_ALIAS_COST = 10_000   # nodes + scalar characters that aliases may add to a document
DEFAULT_MAX_DEPTH = 64        # nested collections; real recipes and cards stay under 6


class BoundedYAMLError(yaml.MarkedYAMLError):
    """A document refused by the budget; `problem` says why and what to change, `problem_mark` where."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem=problem, problem_mark=mark)


class _Bounded:
    """Mixed in front of a Loader class: counts what aliases add and how deep collections nest while composing."""

    max_alias_cost = DEFAULT_ALIAS_COST
    max_depth = DEFAULT_MAX_DEPTH

    def compose_node(self, parent, index):
        if not hasattr(self, "_costs"):
            self._costs, self._alias_cost, self._depth = {}, 0, 0
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            if self.max_alias_cost <= 0:
                raise BoundedYAMLError(f"alias *{event.anchor} is not allowed: write the value out where it is "
                                       "used", event.start_mark)
            node = super().compose_node(parent, index)
            cost = self._costs.get(id(node))
            if cost is None:  # the anchor's node is still being composed: the alias points into itself
                raise BoundedYAMLError(f"alias *{event.anchor} refers to a collection that contains it "
                                       "(recursive alias)", event.start_mark)
            self._alias_cost += cost
            if self._alias_cost > self.max_alias_cost:
                raise BoundedYAMLError(f"alias *{event.anchor}: aliases expand this document by more than "
                                       f"{self.max_alias_cost} nodes and characters (an alias bomb?); write "
                                       "the values out instead of nesting aliases", event.start_mark)
            return node
        self._depth += 1
        if self._depth > self.max_depth:
            raise BoundedYAMLError(f"collections nested more than {self.max_depth} levels deep",
                                   self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.ScalarNode):
            cost = 1 + len(node.value)
        elif isinstance(node, yaml.MappingNode):
            cost = 1 + sum(self._costs[id(k)] + self._costs[id(v)] for k, v in node.value)
        else:
            cost = 1 + sum(self._costs[id(child)] for child in node.value)
        self._costs[id(node)] = cost
        return node


_classes: dict[tuple, type] = {}


def _bounded(loader: type, max_alias_cost: int, max_depth: int) -> type:
    key = (loader, max_alias_cost, max_depth)
    if key not in _classes:
        _classes[key] = type(f"Bounded{loader.__name__}", (_Bounded, loader),
                             {"max_alias_cost": max_alias_cost, "max_depth": max_depth})
    return _classes[key]


def load(text: str, loader: type = yaml.SafeLoader, *, max_alias_cost: int = DEFAULT_ALIAS_COST,
         max_depth: int = DEFAULT_MAX_DEPTH) -> tuple[yaml.Node | None, object]:
    """Compose `text` within the budget, then construct it: (root node for positions, data). One document only.

    Raises BoundedYAMLError for what the budget refuses and yaml.YAMLError for malformed YAML.
    """
    try:
        instance = _bounded(loader, max_alias_cost, max_depth)(text)
    except yaml.reader.ReaderError as exc:  # a control character: not a MarkedYAMLError, so give it a position
        pos = exc.position
        mark = yaml.error.Mark("<unicode string>", pos, text.count("\n", 0, pos), pos - text.rfind("\n", 0, pos) - 1,
                               None, None)
        raise BoundedYAMLError(f"character {exc.character:#06x} is not allowed in YAML", mark) from None
    try:
        node = instance.get_single_node()
        if node is None:
            return None, None
        try:
            return node, instance.construct_document(node)
        except (ValueError, OverflowError, RecursionError) as exc:  # e.g. int("9" * 5000): Python's digit limit
            raise BoundedYAMLError(f"a value cannot be read: {str(exc)[:200]}", node.start_mark) from None
    finally:
        instance.dispose()
