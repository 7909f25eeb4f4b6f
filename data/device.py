"""The one place a --device flag becomes a torch device (with a clear error when CUDA is absent)."""
from __future__ import annotations

import torch

from data.errors import PipelineError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"--device {name}: no CUDA device is available")
    return torch.device(name)
