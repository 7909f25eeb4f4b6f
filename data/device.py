"""The one place a --device flag becomes a torch device, and a --precision flag an autocast context.

torch is imported inside the functions: the configs import PRECISIONS, and the CLI builds them without torch.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

from data.errors import PipelineError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "bf16")


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear error for anything else."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise PipelineError(f"unknown --device {name!r}: choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {name}: no CUDA device is available")
    return device


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the autocast matmuls of ``precision`` produce (float32 for fp32)."""
    import torch

    if precision not in PRECISIONS:
        raise PipelineError(f"--precision {precision!r}: choose {', '.join(PRECISIONS)}")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def autocast(device: torch.device, precision: str):
    """Mixed precision on ``device`` (fp16 or bf16), or a no-op context for fp32."""
    import torch

    dtype = compute_dtype(precision)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch intra-op threads off for the block (process-wide, restored after): for tiny tensors, own workers,
    or results that must not depend on the core count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
