"""Config fields that carry their command-line help: pipeline.py turns each field into an option."""
from __future__ import annotations

from dataclasses import field


def opt(default, help: str, **extra):
    """A dataclass field with its help text (and optionally ``required=True`` or ``choices=(...)``)."""
    return field(default=default, metadata={"help": help, **extra})
