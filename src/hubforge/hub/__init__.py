"""hubforge's local Hugging Face Hub: a stdlib HTTP server speaking the Hub protocol of `huggingface_hub` 2.4.0.

The Hub itself is unreachable from where hubforge runs, so publishing stages talk to this server through the
*unmodified* client (`HF_ENDPOINT=http://127.0.0.1:PORT`, `HF_HUB_DISABLE_XET=1`, both set before importing
`huggingface_hub`). Model, dataset and Space repos, private repos, users with read/write tokens per namespace,
real commit history with branches and tags, LFS uploads via presigned URLs, Range downloads, Space variables,
secrets and runtime, jobs run as local subprocesses, and Trusted Publishers (OIDC token exchange, oauth.py).

Run it:   hubforge hub serve --data-dir hub-data --port 8088     (or: python -m hubforge.hub --data-dir hub-data)
In code:  with serve(Path("hub-data")) as hub: ...                (hub.endpoint, hub.token_path, hub.create_user)

Not supported: Xet storage, pull requests / discussions, gated repos, repo moves.
What the server implements of the Hub's HTTP protocol, and why each detail matters to the client: PROTOCOL.md here.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

from .server import HubStartError, Limits, LocalHub

__all__ = ["LocalHub", "Limits", "HubStartError", "serve", "cli_serve"]


def serve(data_dir: Path, host: str = "127.0.0.1", port: int = 0, *, limits: Limits | None = None,
          oidc_issuer_key: bytes | None = None) -> LocalHub:
    """Start a local Hub on `data_dir` in a background thread; port 0 picks a free port. Stop with `.stop()`.
    `oidc_issuer_key` (else $HUBFORGE_HUB_OIDC_KEY): the HS256 key of the OIDC issuer /oauth/token trusts (oauth.py)."""
    return LocalHub(Path(data_dir), host, port, limits=limits, oidc_issuer_key=oidc_issuer_key).start()


def cli_serve(data_dir: Path, host: str = "127.0.0.1", port: int = 8088) -> None:
    """Serve in the foreground until Ctrl-C, printing the endpoint and (on a terminal only) the default token.

    This is the one place a token is ever shown: it is printed only when stdout is a terminal, never to a log
    or a pipe; otherwise read it from `<data_dir>/token` (mode 0600). A server that cannot start (port in use,
    data dir held by another server) prints one line to stderr and exits with status 1.
    """
    try:
        hub = serve(Path(data_dir), host, port)
    except HubStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"Local Hub serving {hub.data_dir}")
    print(f"HF_ENDPOINT={hub.endpoint}")
    print("HF_HUB_DISABLE_XET=1   (set both before importing huggingface_hub)")
    if hub.oauth.key:
        print("Trusted Publishers: /oauth/token exchanges ID tokens signed (HS256) with HUBFORGE_HUB_OIDC_KEY")
    if hub.token_path.exists() and sys.stdout.isatty():
        print(f"HF_TOKEN={hub.token_path.read_text().strip()}   (default user's write token; shown only here)")
    else:
        print(f"Token of the default user: {hub.token_path} (not printed: stdout is not a terminal)")
    sys.stdout.flush()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
