"""The top operators of one call under torch.profiler: self time and input shapes, as a table and as JSON rows."""
from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def top_operators(fn: Callable[[], None], device: torch.device, rows: int = 20) -> dict:
    """Run ``fn`` once under the profiler; the ``rows`` operators (grouped by name and input shapes) with the
    largest self time (device time on a GPU, host time otherwise), and the call's total self time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages(group_by_input_shape=True) if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    labels = _labels(prof.events())
    top = [{"name": _name(e.key, labels), "self_ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total,
            "calls": e.count, "shapes": str(e.input_shapes)} for e in events[:rows]]
    return {"clock": "device" if device.type == "cuda" else "host", "total_self_ms": total / 1e3, "top": top}


def _labels(events, prefix: str = "fuse.") -> dict[str, str]:
    """Operator name -> the ``record_function`` label (``prefix``...) it runs under, where it always runs under
    one: which pass a compiled graph ("## Call CompiledFxGraph <hash>") is."""
    seen: dict[str, set[str]] = {}
    for e in events:
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(prefix):
            parent = parent.cpu_parent
        seen.setdefault(e.name, set()).add(parent.name if parent is not None else "")
    return {name: next(iter(found)) for name, found in seen.items() if len(found) == 1 and "" not in found}


def _name(key: str, labels: dict[str, str]) -> str:
    """A compiled graph by its label and the start of its hash ("compiled fuse.attention.scores #fe4iq"), the rest
    as the profiler names them."""
    if key.startswith("## Call CompiledFxGraph"):
        graph = key.split()[3]
        return f"compiled {labels.get(key, '')} #{graph[:5]}".replace("  ", " ")
    return key


def print_operators(table: dict, width: int = 200) -> None:
    """The table of ``top_operators``: self time, share of the call's total, calls, input shapes (cut at
    ``width`` characters)."""
    print(f"top operators of one step by {table['clock']} self time "
          f"(total {table['total_self_ms']:.0f} ms over all operators):")
    print(f"{'self ms':>9} {'share':>6} {'calls':>5}  {'operator':<48} input shapes")
    for r in table["top"]:
        shapes = r["shapes"] if len(r["shapes"]) <= width else r["shapes"][:width - 3] + "..."
        name = r["name"] if len(r["name"]) <= 48 else r["name"][:22] + "..." + r["name"][-23:]
        print(f"{r['self_ms']:9.1f} {r['share']:6.1%} {r['calls']:5d}  {name:<48} {shapes}")
