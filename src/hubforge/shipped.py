"""Where the files hubforge ships beside its code are: the card templates and schema (`cards/`) and the Space app
(`space/`). The repository keeps them at its top level; a wheel carries them inside the package (pyproject.toml maps
`cards/` and `space/` to `hubforge/cards` and `hubforge/space` as package data), so both installs find them.

    from hubforge.shipped import folder
    folder("cards") / "templates" / "adapter.md.j2"
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
NAMES = ("cards", "space")


def folder(name: str) -> Path:
    """The shipped folder `name`: inside the installed package (wheel), else the repository's top level (editable)."""
    if name not in NAMES:
        raise ValueError(f"hubforge ships no folder {name!r}; it ships {', '.join(NAMES)}")
    inside = PACKAGE / name
    return inside if inside.is_dir() else PACKAGE.parents[1] / name
