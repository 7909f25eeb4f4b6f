"""Log set-up for the `pipeline` command: our messages at INFO, third-party chatter and known noise kept out."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

# Deprecation notices raised inside libraries we call, about their own code: nothing a user can act on.
THIRD_PARTY_NOISE = (
    # torch_geometric (imported by fuse/) decorates functions with torch.jit.script, which torch now deprecates.
    dict(message=r"`torch\.jit\.script` is deprecated", category=FutureWarning, module=r"torch\.jit\."),
)


def hide_third_party_noise() -> None:
    """Ignore exactly the notices in THIRD_PARTY_NOISE (by message, category and module); all others shown."""
    for noise in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", **noise)


def configure(verbose: bool = False) -> None:
    """INFO from the ``pipeline.*`` loggers (DEBUG with ``verbose``), WARNING and above from everything else;
    exactly the notices in THIRD_PARTY_NOISE ignored (by message, category and module), all others shown."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pipeline").setLevel(logging.DEBUG if verbose else logging.INFO)
    hide_third_party_noise()
    if not verbose:
        # torch's C++-extension helper says where it looked for CUDA whenever torch.compile loads it, also on
        # machines without a GPU, where it means nothing.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        # transformers' and huggingface_hub's own bars (loading, saving weights) follow ours: terminal only.
        # Read when they are imported, which the stages do after this.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def without_warning(logger: str, start: str) -> Iterator[None]:
    """Leave out the messages of ``logger`` that begin with ``start`` (for a caller that says it otherwise)."""
    drop = logging.Filter()
    drop.filter = lambda record: not record.getMessage().startswith(start)
    logging.getLogger(logger).addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(drop)
