"""Fail loudly when the installed stack drifts from the versions hubforge pins (pyproject.toml).

The training chain, the GGUF converter and the Hub protocol were measured with exact versions; a different
transformers or huggingface_hub changes behaviour silently. `hubforge run` calls `check()` before any stage.
HUBFORGE_ALLOW_VERSION_DRIFT=1 turns the error into a warning for people who know what they are doing.
"""
from __future__ import annotations

import os
import warnings
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version


def pinned() -> dict[str, str]:
    """name -> exact version, from hubforge's own installed metadata (i.e. pyproject.toml)."""
    pins = {}
    for line in metadata.requires("hubforge") or []:
        req = Requirement(line)
        if req.marker is not None:  # extras such as [test]
            continue
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[req.name] = exact[0]
    return pins


def drift() -> list[str]:
    problems = []
    for name, want in pinned().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed (hubforge pins {want})")
            continue
        if Version(have).public != Version(want).public:  # 2.13.0+cu128 is the pinned 2.13.0, built for CUDA
            problems.append(f"{name} {have} is installed; hubforge pins {want}")
    return problems


def check() -> None:
    problems = drift()
    if not problems:
        return
    message = "installed packages differ from hubforge's pins:\n  " + "\n  ".join(problems) + \
        "\nreinstall with `make install` (or pip install -e .), or set HUBFORGE_ALLOW_VERSION_DRIFT=1 to continue anyway"
    if os.environ.get("HUBFORGE_ALLOW_VERSION_DRIFT") == "1":
        warnings.warn(message, stacklevel=2)
    else:
        raise RuntimeError(message)
