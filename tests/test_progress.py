"""Readable logs: a bar only on a terminal, one summary line otherwise; no third-party deprecation noise."""
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

from data.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_terminal_one_summary_line(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="pipeline"):
        with Progress("blip val", 10, unit="row") as progress:
            progress.update(6, "images")
            progress.update(4, "texts", loss=0.5)
    assert capsys.readouterr().err == ""  # no bar
    [record] = caplog.records
    line = record.getMessage()
    assert line.startswith("blip val: 10 rows in ") and "images " in line and "texts " in line and "loss 0.5" in line
    with caplog.at_level(logging.INFO, logger="pipeline"):
        Progress("stopped", 10).close()
    assert caplog.records[-1].getMessage().startswith("stopped: 0 of 10 rows")


def test_on_a_terminal_a_bar_and_no_log_line(caplog, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with caplog.at_level(logging.INFO, logger="pipeline"):
        with Progress("clip test", 8, unit="row") as progress:
            progress.update(8, "images")
    assert "clip test" in sys.stderr.getvalue() and "8/8" in sys.stderr.getvalue()
    assert not caplog.records


def test_known_third_party_deprecation_noise_is_filtered():
    code = """
import warnings, torch
with warnings.catch_warnings(record=True) as raw:  # what torch says unfiltered
    warnings.simplefilter("always")
    try:
        torch.jit.script(lambda x: x + 1)
    except OSError:  # no source for a -c lambda: the notice came first
        pass
print([str(w.message) for w in raw])
from data.logs import configure
configure()
import fuse.model  # torch_geometric decorates functions with torch.jit.script
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "torch.jit.script` is deprecated" in proc.stdout
    assert "deprecated" not in proc.stderr, proc.stderr


def test_extract_piped_prints_lines_not_bars(tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "extract", "--backbone", "clip-tiny",
                           "--data-root", str(tiny_data), "--split", "test", "--cache", str(tmp_path / "c")],
                          env=env, capture_output=True, timeout=300)
    stderr = proc.stderr.decode()  # not text=True, which would turn a bar's \r into \n
    assert proc.returncode == 0, stderr
    assert "\r" not in stderr and "%|" not in stderr and "Warning" not in stderr
    assert "root:" not in stderr  # open_clip's own INFO chatter
    summary = [line for line in stderr.splitlines() if "pipeline.extract: clip-tiny test: " in line]
    assert len(summary) == 1 and "images " in summary[0] and "texts " in summary[0], stderr


def test_piped_logs_turn_off_third_party_bars_and_the_cuda_home_notice():
    """transformers' 'Loading weights' bars (from_pretrained on --checkpoint folders) follow ours when piped,
    and torch's 'No CUDA runtime is found, using CUDA_HOME' notice stays out unless -v."""
    code = ("import logging, os; from data.logs import configure; configure(); import transformers; "
            "print(transformers.utils.logging.is_progress_bar_enabled(), "
            "logging.getLogger('torch.utils.cpp_extension').getEffectiveLevel() > logging.WARNING)")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
