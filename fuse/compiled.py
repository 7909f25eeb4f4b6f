"""The training step's ``torch.compile``'d pieces (GATv2 attention passes, ITC loss), with an eager fallback.

Each piece is a plain PyTorch function that inductor fuses into a few loop nests (C++/OpenMP on CPU, Triton
on GPU). It is compiled lazily on first use, with dynamic shapes (new batch or token counts do not recompile),
and cached on disk by inductor.

Which runs is the *impl*: ``compiled``, ``eager``, or ``auto`` (the default): compiled, and should compiling
fail (no C++ compiler, no Triton, an inductor bug), a warning and the eager version for the rest of the
process. The default is set by :func:`set_default_impl` or the ``FUSE_ATTENTION_IMPL`` environment variable.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

IMPLS = ("auto", "compiled", "eager")
_default_impl = os.environ.get("FUSE_ATTENTION_IMPL", "auto")
if _default_impl not in IMPLS:
    raise ValueError(f"FUSE_ATTENTION_IMPL must be one of {IMPLS}, got {_default_impl!r}")


def set_default_impl(impl: str) -> None:
    """Choose the implementation used where a caller passes ``impl=None``."""
    global _default_impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _default_impl = impl


def resolve(impl: Optional[str]) -> str:
    """``impl``, or the default for None; checked."""
    impl = _default_impl if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class Compiled:
    """Lazily compiled functions by name; remembers a compile failure (then impl 'auto' runs eager)."""

    def __init__(self):
        self._fns: dict[str, Callable] = {}
        self.error: Optional[BaseException] = None

    def __call__(self, name: str, fn: Callable, *args, options: Optional[dict] = None):
        if name not in self._fns:
            self._fns[name] = torch.compile(fn, dynamic=True, options=options)
        with torch.profiler.record_function(f"fuse.{name}"):  # names the piece in profiles
            return self._fns[name](*args)


_compiled = Compiled()


def wants_eager(impl: Optional[str]) -> bool:
    """Whether ``impl`` runs the eager version now (asked for, or 'auto' after a compile failure)."""
    impl = resolve(impl)
    return impl == "eager" or (impl == "auto" and _compiled.error is not None)


def try_compiled(impl: Optional[str], name: str, fn: Callable, *args, options: Optional[dict] = None):
    """(True, result) from the compiled ``fn``, or (False, None) where the caller runs its eager version."""
    impl = resolve(impl)
    if wants_eager(impl):
        return False, None
    if impl == "compiled":
        return True, _compiled(name, fn, *args, options=options)
    try:
        return True, _compiled(name, fn, *args, options=options)
    except Exception as err:  # no C++ compiler, no Triton, an inductor bug...
        if isinstance(err, torch.OutOfMemoryError) or "allocate memory" in str(err):
            raise  # the eager version would not fit either; not a compiler problem
        _compiled.error = err
        warnings.warn(f"fuse: torch.compile failed ({type(err).__name__}: {err}); "
                      "using the eager implementation from now on", RuntimeWarning, stacklevel=3)
        return False, None
