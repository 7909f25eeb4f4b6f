"""Progress of a long task: a live bar on a terminal, one summary line when the output is a log or a pipe."""
from __future__ import annotations

import logging
import sys
import threading
import time

from tqdm import tqdm


class Progress:
    """Counts units of work (rows, pairs, shards), optionally by kind (images, texts); thread-safe.

    When stderr is a terminal: a tqdm bar with each kind's rate. Otherwise nothing until ``close``, which
    logs one line: how many, how long, the rates and the last values passed to ``update`` (e.g. the loss).
    A kind's rate counts the time since the previous update as spent on it (exact when kinds take turns).
    """

    def __init__(self, desc: str, total: int, unit: str = "row", logger: str = "pipeline", leave: bool = True):
        self.desc, self.total, self.unit, self.log = desc, total, unit, logging.getLogger(logger)
        self.done, self.counts, self.busy, self.values = 0, {}, {}, {}
        self.t0 = self.last = time.perf_counter()
        self.lock = threading.Lock()
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave) \
            if sys.stderr.isatty() else None

    def update(self, n: int, kind: str | None = None, **values) -> None:
        """``n`` more units done (of ``kind``); ``values`` (e.g. loss=0.52) are shown beside the rates."""
        with self.lock:
            now = time.perf_counter()
            self.done += n
            if kind is not None:
                self.counts[kind] = self.counts.get(kind, 0) + n
                self.busy[kind] = self.busy.get(kind, 0.0) + now - self.last
            self.last = now
            self.values.update(values)
            if self.bar is not None:
                self.bar.set_postfix({f"{k}/s": f"{r:,.1f}" for k, r in self.rates().items()} | self._values(),
                                     refresh=False)
                self.bar.update(n)

    def rates(self) -> dict[str, float]:
        """Units per second of each kind."""
        return {k: self.counts[k] / max(self.busy[k], 1e-9) for k in self.counts}

    def _values(self) -> dict[str, str]:
        return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in self.values.items()}

    def summary(self) -> str:
        seconds = time.perf_counter() - self.t0
        done = f"{self.done:,}" if self.done == self.total else f"{self.done:,} of {self.total:,}"
        rates = self.rates() or {f"{self.unit}s": self.done / max(seconds, 1e-9)}
        details = [f"{k} {r:,.1f}/s" for k, r in rates.items()] + [f"{k} {v}" for k, v in self._values().items()]
        return f"{self.desc}: {done} {self.unit}s in {seconds:.1f} s ({', '.join(details)})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.total:
            self.log.info("%s", self.summary())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
