"""The one place a --device flag becomes a torch device (with a clear error when CUDA is absent), and CPU threads."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from data.errors import PipelineError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch intra-op threads off for the block (process-wide, restored after): for tiny tensors, own workers,
    or results that must not depend on the core count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
