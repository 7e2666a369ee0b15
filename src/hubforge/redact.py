"""Keep secrets out of logs, manifests, cards and exception messages.

Every message that leaves a stage (errors recorded in the manifest, CLI output) passes through `redact`.
"""
from __future__ import annotations

import os
import re

_TOKEN_PATTERN = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|api_[A-Za-z0-9]{8,})\b")
_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUBFORGE_TOKEN")


def redact(text: str) -> str:
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "***")
    return _TOKEN_PATTERN.sub("hf_***", text)
