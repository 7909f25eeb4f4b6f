"""bench/operators.py: the operator table `bench/fuse.py --profile` prints."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.operators import _labels, _name, print_operators, top_operators  # noqa: E402


def test_top_operators_by_self_time_with_shapes_and_labels(capsys):
    a, b = torch.randn(300, 200), torch.randn(200, 100)

    def step():
        with torch.profiler.record_function("fuse.attention.scores"):
            torch.mm(a, b)
        a.sum()

    table = top_operators(step, torch.device("cpu"), rows=5)
    assert table["clock"] == "host" and table["total_self_ms"] > 0
    names = [r["name"] for r in table["top"]]
    assert "aten::mm" in names
    mm = table["top"][names.index("aten::mm")]
    assert mm["calls"] == 1 and mm["shapes"] == "[[300, 200], [200, 100]]" and 0 < mm["share"] <= 1
    print_operators(table)
    assert "aten::mm" in capsys.readouterr().out


def test_compiled_graphs_are_named_by_their_pass():
    x = torch.ones(3)
    with torch.profiler.profile() as prof:
        with torch.profiler.record_function("fuse.attention.messages"):
            x.mul_(2)  # only under the label
            x.add_(1)
        x.add_(1)  # also outside it: no label
    labels = _labels(prof.events())
    assert labels["aten::mul_"] == "fuse.attention.messages"
    assert "aten::add_" not in labels
    key = "## Call CompiledFxGraph fe4iq42vgac2zlomakxtry ##"
    assert _name(key, {key: "fuse.attention.messages"}) == "compiled fuse.attention.messages #fe4iq"
    assert _name("aten::mm", {}) == "aten::mm"
