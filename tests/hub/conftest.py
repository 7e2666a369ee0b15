"""Fixtures for the local Hub tests: one server per session on a port chosen at import time.

`huggingface_hub` reads HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_HOME and telemetry settings when it is imported, so
they are set here, at conftest import, before any test module imports it. If something imported the client
earlier with a 127.0.0.1 endpoint, that endpoint's port is reused so the import-time constants still match;
with any other endpoint the few constants read at call time are patched. Tests pass `endpoint=`/`token=`
explicitly wherever the client allows it.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_existing = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/?", os.environ.get("HF_ENDPOINT", ""))
PORT = int(_existing.group(1)) if (_existing and "huggingface_hub" in sys.modules) else _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
_HF_HOME = tempfile.mkdtemp(prefix="hubforge-test-hf-home-")
os.environ.update(HF_ENDPOINT=ENDPOINT, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                  HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=_HF_HOME, NO_PROXY="127.0.0.1,localhost")
if "huggingface_hub" in sys.modules and not _existing:
    from huggingface_hub import constants as _constants

    _constants.ENDPOINT = ENDPOINT
    _constants.HUGGINGFACE_CO_URL_TEMPLATE = ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}"
    _constants.HF_HUB_DISABLE_XET = True
    _constants.HF_HUB_DISABLE_TELEMETRY = True
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    from hubforge.hub import serve

    server = serve(tmp_path_factory.mktemp("hub-data"), port=PORT)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token(hub) -> str:
    return hub.token_path.read_text().strip()


@pytest.fixture(scope="session")
def api(hub, token):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=token)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "hf-cache"
