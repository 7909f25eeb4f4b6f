"""The README's CLI reference lists exactly the options `--help` shows."""
import re
from pathlib import Path

import click
import pytest

from pipeline import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def reference_section() -> str:
    return README.split("## CLI reference", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("command", ["extract", "fuse", "score", "export", "search", "demo"])
def test_cli_reference_matches_help(command):
    params = cli.commands[command].params
    flags = {next(o for o in p.opts if o.startswith("--")) for p in params
             if isinstance(p, click.Option) and p.name != "help"}  # arguments (search's TEXT) are not options
    paragraph = next(p for p in reference_section().split("\n\n") if p.startswith(f"`pipeline {command}`"))
    listed = set(re.findall(r"`(--[a-z0-9-]+)`", paragraph))
    assert listed == flags, (sorted(flags - listed), sorted(listed - flags))


def test_disk_space_table_is_the_one_computed_from_the_schema():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "disk_table.py"
    spec = importlib.util.spec_from_file_location("disk_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [row for row in module.rows() if row not in README]
    assert not missing, missing
