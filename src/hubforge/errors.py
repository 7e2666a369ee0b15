"""The errors that every layer of hubforge may raise: the ground floor, importing nothing of hubforge.

    from hubforge.errors import StageError
    raise StageError("data.format 'squad' needs columns question, context, answers; add data.columns")

A `StageError` is the message a user acts on: it says what is wrong and how to fix it. The pipeline records it
in the manifest (redacted) and the CLI prints it and exits 1.
"""
from __future__ import annotations


class StageError(RuntimeError):
    """A stage refused or failed in a way the user can act on (message says what and how to fix it)."""
