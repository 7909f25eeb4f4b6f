"""The star attention's hand-written CPU loops (``fuse/star_attention.cpp``): built, cached, loaded, called.

On CPU in float32 the compiled attention runs one C++ pass forward (scores, softmax, dropout, messages) and
one backward (the attention's gradient, softmax backward, ``d x_l`` and the sums behind ``d x_r``, ``d w``
and ``d att``) instead of the five torch.compile'd passes: per sample, row after row, so ``x_l`` streams
in the order ``lin_l`` wrote it (see the source's header for why inductor's loops could not).

The source is compiled on first use with the C++ compiler inductor uses (``$CXX``, else ``g++``), OpenMP and
the vector instructions torch detected on this CPU, in about a second, into a per-user cache folder
(``$FUSE_KERNEL_CACHE``, else under the temporary folder), named by a hash of the source, the flags and the
compiler; it is loaded with ctypes. Should that fail, a warning, and the inductor passes for the rest of the
process. ``FUSE_ATTENTION_NATIVE=0`` (or :func:`set_enabled`) turns these loops off.
"""
from __future__ import annotations

import ctypes
import getpass
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("star_attention.cpp")
MAX_TARGETS = 4  # the source compiles T = 1..4
# Per torch.backends.cpu.get_cpu_capability(): the instructions, and the floats per vector the loops use
# (one register's worth; wider vectors split badly). Anything else: the compiler's default, 4 (SSE2, NEON).
_ISA = {"AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-DSTAR_LANES=16"],
        "AVX2": ["-mavx2", "-mfma", "-DSTAR_LANES=8"]}

_enabled = os.environ.get("FUSE_ATTENTION_NATIVE", "1") != "0"
_lib: Optional[ctypes.CDLL] = None
error: Optional[BaseException] = None  # why the build or load failed, once it has
_lock = threading.Lock()


def set_enabled(flag: bool) -> None:
    """Use the C++ loops where they apply (True, the default) or always the inductor passes."""
    global _enabled
    _enabled = bool(flag)


def ready(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the C++ loops serve ``dtype`` features on ``device``: CPU float32, enabled, built (on first ask)."""
    return _enabled and device.type == "cpu" and dtype == torch.float32 and _library() is not None


def applies(x_l: Tensor, x_r: Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether the C++ loops run this call: :func:`ready` for x_l, float32 throughout, 1 to 4 targets."""
    return (x_l.dtype == x_r.dtype == compute_dtype and 1 <= x_r.size(1) <= MAX_TARGETS
            and ready(x_l.device, x_l.dtype))


def in_use() -> bool:
    """Whether the C++ loops have been built and are enabled (they then run wherever :func:`applies`)."""
    return _enabled and _lib is not None


def cache_dir() -> Path:
    """Where built libraries are kept: ``$FUSE_KERNEL_CACHE``, else a private per-user temporary folder."""
    configured = os.environ.get("FUSE_KERNEL_CACHE")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"hada_pipeline_{getpass.getuser()}"


def build_command(output: Path) -> list[str]:
    """The compiler command that builds the source into ``output``."""
    cxx = os.environ.get("CXX", "g++")
    isa = _ISA.get(torch.backends.cpu.get_cpu_capability(), ["-DSTAR_LANES=4"])
    # -ffp-contract=off: z is rounded as PyG rounds it (no fused multiply-add), so [z > 0] agrees.
    return [cxx, "-std=c++17", "-O3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off", "-Wno-psabi", *isa,
            str(SOURCE), "-o", str(output)]


def build(folder: Optional[Path] = None) -> Path:
    """The built library, compiled into ``folder`` (default :func:`cache_dir`) unless it is there already."""
    folder = cache_dir() if folder is None else folder
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user; set FUSE_KERNEL_CACHE to a folder of yours")
    cmd = build_command(Path("OUT"))
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(f"no C++ compiler {cmd[0]!r} (set CXX)")
    version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(cmd), version]).encode()).hexdigest()[:16]
    path = folder / f"star_attention-{key}.so"
    if path.is_file():
        return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(build_command(Path(tmp)), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    head = [ptr] * 7 + [ctypes.c_float] + [i64] * 5  # x_l, row, mask, x_r, e, w, att, slope, N, T, S, H, C
    lib.star_forward.argtypes = head + [ptr] * 4 + [ctypes.c_int]
    lib.star_backward.argtypes = head + [ptr] * 6 + [ctypes.c_int] + [ptr] * 6 + [ctypes.c_int]
    lib.star_forward.restype = lib.star_backward.restype = ctypes.c_int
    return lib


def _library() -> Optional[ctypes.CDLL]:
    """The loaded library, built on first use; None (after one warning) if that failed."""
    global _lib, error
    if _lib is not None or error is not None:
        return _lib
    with _lock:
        if _lib is None and error is None:
            try:
                _lib = _load(build())
            except Exception as err:  # no compiler, no OpenMP, a read-only cache...
                error = err
                warnings.warn(f"fuse: the C++ attention loops are not available ({type(err).__name__}: {err}); "
                              "using the torch.compile'd passes", RuntimeWarning, stacklevel=3)
    return _lib


def _ptr(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _head(x_l, row, mask, x_r, e, w, att, slope):
    """The arguments both calls begin with (inputs made contiguous; row and mask as int64 and bytes)."""
    n, t, hh, c = x_r.shape
    tensors = [x_l.contiguous(), row.contiguous(), mask.contiguous().view(torch.uint8), x_r.contiguous(),
               e.contiguous(), w.contiguous(), att.contiguous()]
    return tensors, [*map(_ptr, tensors), ctypes.c_float(slope), n, t, row.size(1), hh, c]


def forward(x_l: Tensor, row: Tensor, mask: Tensor, x_r: Tensor, e: Tensor, w: Tensor, att: Tensor, slope: float,
            noise: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha, alpha_d, messages): the softmax over the real sources of the scores, it times ``noise`` (the
    dropout's scaled mask; alpha itself without it), and sum_s alpha_d * x_l[row]."""
    kept, head = _head(x_l, row, mask, x_r, e, w, att, slope)
    alpha = torch.empty(*e.shape, att.size(0), dtype=torch.float32)
    alpha_d = alpha if noise is None else torch.empty_like(alpha)
    noise = None if noise is None else noise.contiguous()
    out = torch.empty_like(x_r, memory_format=torch.contiguous_format)  # the loops write every output densely
    with torch.profiler.record_function("fuse.attention.native_forward"):
        rc = _library().star_forward(*head, _ptr(noise), _ptr(alpha), _ptr(alpha_d), _ptr(out),
                                     torch.get_num_threads())
    del kept
    if rc:
        raise ValueError(f"star_forward: {x_r.size(1)} targets; at most {MAX_TARGETS} are compiled")
    return alpha, alpha_d, out


def backward(x_l: Tensor, row: Tensor, mask: Tensor, x_r: Tensor, e: Tensor, w: Tensor, att: Tensor, slope: float,
             alpha: Tensor, alpha_d: Tensor, noise: Optional[Tensor], messages: Tensor, g_out: Tensor,
             g_sum: Optional[Tensor], padded: bool) -> tuple[Tensor, ...]:
    """(d x_l, g, p_sum, pe_sum, pz_sum, gx_sum) from :func:`forward`'s alpha, alpha_d and messages and the
    gradients of its outputs: g the scores' gradient (N, T, S, H); with p = [z > 0] g, p_sum = sum_s p
    (N, T, H, C), pe_sum = sum p e, pz_sum = sum p z and gx_sum = sum (sum_t g) x_l (H, C). With ``padded``
    the rows are the slots themselves and padding rows get zero gradient."""
    kept, head = _head(x_l, row, mask, x_r, e, w, att, slope)
    extra = [t if t is None else t.contiguous() for t in (alpha, alpha_d, noise, messages, g_out, g_sum)]
    dense = torch.contiguous_format  # the loops write every output densely
    dx_l, g = torch.empty_like(kept[0], memory_format=dense), torch.empty_like(alpha, memory_format=dense)
    p_sum = torch.empty_like(x_r, memory_format=dense)
    pe, pz, gx = (torch.empty_like(att, memory_format=dense) for _ in range(3))
    with torch.profiler.record_function("fuse.attention.native_backward"):
        rc = _library().star_backward(*head, *map(_ptr, extra), int(padded), *map(_ptr, (dx_l, g, p_sum, pe, pz, gx)),
                                      torch.get_num_threads())
    del kept, extra
    if rc:
        raise ValueError(f"star_backward: {x_r.size(1)} targets; at most {MAX_TARGETS} are compiled")
    return dx_l, g, p_sum, pe, pz, gx
