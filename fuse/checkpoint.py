"""Run folders: config, checkpoints (atomic, loaded with weights_only=True) and the metrics log."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from data.atomic import atomic_path, read_json, write_json, write_text
from data.errors import PipelineError
from data.torch_files import load_pt


def save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path, what: str | None = None) -> dict:
    """A checkpoint of this project (``weights_only=True``); ``what`` names it in the message when it is missing."""
    if not path.is_file():
        raise PipelineError(f"{what or 'checkpoint'}: no checkpoint at {path}")
    return load_pt(path, "checkpoint")


def write_metrics(path: Path, history: list[dict]) -> None:
    """The whole log, rewritten atomically from the checkpoint's history (so it never runs ahead of it)."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in history))


def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise PipelineError(f"{run_dir} is not a run (no config.json): train it with `pipeline fuse`")
    return read_json(path)


def write_config(run_dir: Path, config: dict) -> None:
    write_json(run_dir / "config.json", config)
