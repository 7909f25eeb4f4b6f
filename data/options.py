"""Config fields that carry their command-line help: pipeline.py turns each field into an option.

A field whose type is itself a config dataclass (e.g. the fusion model's hyperparameters inside the fusion
run's config) is flattened: its fields become options of the command too, and ``from_options`` nests them
back.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import field


def opt(default, help: str, **extra):
    """A dataclass field with its help text (and optionally ``required=True`` or ``choices=(...)``)."""
    return field(default=default, metadata={"help": help, **extra})


def flag(name: str) -> str:
    """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _nested(hint) -> type | None:
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def option_fields(config_cls) -> list[tuple[dataclasses.Field, object]]:
    """(field, type hint) of every option of a config dataclass, nested config dataclasses flattened in place."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        sub = _nested(hints[f.name])
        out += option_fields(sub) if sub else [(f, hints[f.name])]
    return out


def option_defaults(config_cls) -> dict:
    """{option name: default} over the flattened fields."""
    return {f.name: f.default for f, _ in option_fields(config_cls)}


def from_options(config_cls, values: dict):
    """Build a config from flat option values (missing ones take their defaults), nesting sub-configs."""
    hints = typing.get_type_hints(config_cls)
    kwargs = {}
    for f in dataclasses.fields(config_cls):
        sub = _nested(hints[f.name])
        if sub:
            kwargs[f.name] = from_options(sub, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return config_cls(**kwargs)
