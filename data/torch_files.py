"""Reading ``.pt`` files safely: ``torch.load(weights_only=True)``, and one clear line when that fails."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from data.errors import PipelineError


def _reason(error: Exception) -> str:
    """The useful part of a torch.load failure: the refused global if that is why, else what the file is not."""
    text = str(error)
    refused = re.search(r"Unsupported global: (GLOBAL \S+)", text)
    if refused:
        return f"{refused.group(1)} is not allowed (only tensors and plain containers are)"
    if isinstance(error, (KeyError, EOFError, pickle.UnpicklingError)) or not text.strip():
        return "not a PyTorch file, or a damaged one"
    return f"{type(error).__name__}: {text.strip().splitlines()[0]}"


def load_pt(path: str | Path, what: str, allowed: list | None = None):
    """``torch.load`` on the CPU with ``weights_only=True`` (plus the ``allowed`` globals); any failure becomes
    a PipelineError naming ``what`` and the file."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- refused unpickling or a damaged file: name the file, one line
        raise PipelineError(f"{what} {path} cannot be loaded safely: {_reason(e)}") from None
