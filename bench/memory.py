"""This process's resident memory from /proc (Linux), for the benchmarks' peak-memory figures."""
from __future__ import annotations


def rss_gib(field: str = "VmRSS") -> float:
    """Resident memory (VmRSS) or its peak since the last reset_peak_rss (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kb / 2 ** 20


def reset_peak_rss() -> None:
    """VmHWM := VmRSS (Linux >= 4.0; ru_maxrss cannot be reset, and a child inherits its parent's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
