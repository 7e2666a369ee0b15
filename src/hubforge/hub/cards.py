"""Card metadata (a README's YAML front matter) on the local Hub: parsed once, when a commit adds the README.

The parse goes through `hubforge.safeyaml` with a small alias budget, so a few hundred bytes of nested aliases
cannot become megabytes in every listing. Like the Hub, a commit whose README.md front matter is not valid
YAML, is not a mapping, or is over the budget is refused (400, naming the line and column); otherwise the
metadata, turned into plain JSON values, is stored in the commit record under "card" and every listing,
repo-info and Space lookup reads it from there. `/api/validate-yaml` applies the same check, so the real client
refuses such a README before uploading anything.
"""
from __future__ import annotations

import datetime
import re
import threading
from collections import OrderedDict

import yaml

from hubforge import safeyaml

from .errors import bad_request

MAX_README_BYTES = 1 << 20     # larger READMEs are stored but get no card metadata (as before)
MAX_ALIAS_COST = 10_000        # nodes + characters aliases may add (real cards rarely use aliases at all)
MAX_DEPTH = 32
# Same front-matter pattern as huggingface_hub.repocard.REGEX_YAML_BLOCK.
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_legacy: OrderedDict[str, dict | None] = OrderedDict()  # records written before cards were stored (old data dirs)
_legacy_lock = threading.Lock()


def jsonable(value):
    """YAML values -> JSON values: dates as ISO strings, sets as lists, keys as strings (depth is bounded)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def front_matter(text: str) -> dict | None:
    """YAML front matter of a README as JSON-ready data, None if there is none; ValueError saying what is wrong."""
    m = _YAML_BLOCK.search(text)
    if not m:
        return None
    offset = text.count("\n", 0, m.start(2))  # report lines of the README, not of the YAML block
    try:
        _, data = safeyaml.load(m.group(2), max_alias_cost=MAX_ALIAS_COST, max_depth=MAX_DEPTH)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1 + offset}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "invalid YAML"
        what = ("README front matter" if isinstance(exc, safeyaml.BoundedYAMLError)
                else "Invalid YAML in README front matter")
        raise ValueError(f"{what}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README front matter must be a YAML mapping")
    return jsonable(data)


def _read(blobs, entry: dict) -> str | None:
    if entry["size"] > MAX_README_BYTES:
        return None
    try:
        return blobs.path(entry["sha256"]).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # not text: no metadata, like a README without front matter


def card_for_commit(blobs, entry: dict) -> dict | None:
    """The card data a commit adding this README.md stores; 400 when its front matter would be refused."""
    text = _read(blobs, entry)
    try:
        return front_matter(text) if text is not None else None
    except ValueError as exc:
        raise bad_request(f"README.md: {exc}") from None


def stored_card(blobs, record: dict) -> dict | None:
    """The card data of a commit: what was stored at commit time (records of older versions: parsed once here)."""
    if "card" in record:
        return record["card"]
    entry = record["tree"].get("README.md")
    if entry is None:
        return None
    key = entry["sha256"]
    with _legacy_lock:
        if key in _legacy:
            return _legacy[key]
    try:
        text = _read(blobs, entry)
        card = front_matter(text) if text is not None else None
    except (ValueError, OSError):
        card = None
    with _legacy_lock:
        _legacy[key] = card
        while len(_legacy) > 256:
            _legacy.popitem(last=False)
    return card
