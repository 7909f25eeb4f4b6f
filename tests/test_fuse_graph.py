"""fuse.graph against hand-built HADA graphs (bipartite and dense layouts, PyG's self-loops), and
PackedFeatures.gather."""
import dataclasses

import pytest
import torch
from torch_geometric.nn import GATv2Conv

from fuse.batch import NodeBlock, PackedFeatures, gather_batch
from fuse.config import EdgeWeights, ModelConfig
from fuse.graph import bipartite_graph, dense_graph, self_loop_weights

W = ModelConfig().edge_weights  # the reference's 0.9 / 0.7 / 1.1, PyG mean self-loops

pytestmark = pytest.mark.usefixtures("one_thread")


def edge_set(edge_index, edge_attr):
    """Edges as a sorted list of (src, dst, weight) so order does not matter."""
    return sorted((int(s), int(d), round(float(w), 6))
                  for (s, d), w in zip(edge_index.t().tolist(), edge_attr.view(-1).tolist()))


def reference_edges(counts, weights=W):
    """Edges into global nodes by HADA's rules, sample by sample with Python loops, as (source node in the
    backbone-major order, target i * B + b, weight); self-loops weigh the mean of the other incoming edges
    (PyG's fill_value='mean') unless the weights name one. An independent construction."""
    num_b, n = len(counts), len(counts[0])
    base = [0]
    for c in counts:
        base.append(base[-1] + sum(c))

    def node(b, i, r):  # row r of sample i of backbone b
        return base[b] + sum(counts[b][:i]) + r

    edges = []
    for i in range(n):
        for t in range(num_b):
            incoming = []
            for b in range(num_b):
                for r in range(counts[b][i]):
                    if b == t and r == 0:
                        continue
                    w = (weights.global_global if r == 0 else
                         weights.token_own if b == t else weights.token_other)
                    incoming.append((node(b, i, r), i * num_b + t, w))
            loop = weights.self_loop
            if loop is None:
                loop = sum(w for *_, w in incoming) / len(incoming) if incoming else 0.0
            edges += incoming + [(node(t, i, 0), i * num_b + t, loop)]
    return sorted((s, d, round(w, 6)) for s, d, w in edges)


def as_counts(counts):
    return [torch.tensor(c, dtype=torch.long) for c in counts]


def rows(counts):
    return [sum(c) for c in counts]


def test_two_backbones_literal():
    # Sample: backbone 0 has c0 + 2 tokens (nodes 0, 1, 2), backbone 1 only c1 (node 3).
    ei, ea, glob = bipartite_graph(as_counts([[3], [1]]), W, [3, 1])
    expected = sorted([
        (1, 0, 0.9), (2, 0, 0.9),  # tokens -> own global (target 0 = c0)
        (1, 1, 0.7), (2, 1, 0.7),  # tokens -> other global (target 1 = c1)
        (3, 0, 1.1), (0, 1, 1.1),  # global <-> global
        (0, 0, round((0.9 * 2 + 1.1) / 3, 6)), (3, 1, round((0.7 * 2 + 1.1) / 3, 6)),  # PyG mean self-loops
    ])
    assert edge_set(ei, ea) == expected
    assert ea.shape == (len(expected), 1) and ea.dtype == torch.float32
    assert glob.tolist() == [[0, 3]]


def test_self_loops_of_hada_lavis_shapes():
    """BLIP 577 rows + one CLIP node: 0.9003 and 0.7007, as HADA.md derives; explicit weights as given."""
    loops = self_loop_weights(as_counts([[577], [1]]), W)
    assert loops.tolist()[0] == pytest.approx([(576 * 0.9 + 1.1) / 577, (576 * 0.7 + 1.1) / 577])
    assert round(loops[0, 0].item(), 4) == 0.9003 and round(loops[0, 1].item(), 4) == 0.7007
    assert self_loop_weights(as_counts([[1]]), W).tolist() == [[0.0]]  # no incoming edges: PyG gives 0
    assert self_loop_weights(as_counts([[5], [2]]), dataclasses.replace(W, self_loop=1.0)).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("weights", [W, EdgeWeights(0.1, 0.2, 0.3, 0.4)])
@pytest.mark.parametrize("counts", [
    [[3, 1, 5, 2], [1, 1, 1, 1]],  # sample 1 has no token nodes at all
    [[2, 4, 1], [3, 1, 2], [1, 1, 1]],
    [[1], [1]],
])
def test_bipartite_matches_reference(counts, weights):
    ei, ea, glob = bipartite_graph(as_counts(counts), weights, rows(counts))
    assert edge_set(ei, ea) == reference_edges(counts, weights)
    starts = [[sum(rows(counts)[:b]) + sum(c[:i]) for b, c in enumerate(counts)] for i in range(len(counts[0]))]
    assert glob.tolist() == starts


@pytest.mark.parametrize("counts", [[[3, 1, 5, 2], [1, 1, 1, 1]], [[2, 4, 1], [3, 1, 2], [1, 1, 1]]])
def test_dense_layout_holds_the_same_edges(counts):
    n, num_b = len(counts[0]), len(counts)
    slots = max(sum(c[i] for c in counts) for i in range(n)) + 2  # spare padding
    g = dense_graph(as_counts(counts), W, rows(counts), slots)
    # Map each stacked row to its slot, then read the (N, B, S) table back as edges.
    node_of_slot = {}
    base = 0
    for b, flat in enumerate(g.slots):
        for r, slot in enumerate(flat.tolist()):
            node_of_slot[slot] = base + r
        base += rows(counts)[b]
    assert g.mask.sum() == sum(rows(counts)) and len(node_of_slot) == sum(rows(counts))
    edges = [(node_of_slot[i * slots + s], i * num_b + t, round(float(g.edge_attr[i, t, s]), 6))
             for i in range(n) for t in range(num_b) for s in range(slots) if g.mask[i, s]]
    assert sorted(edges) == reference_edges(counts)
    assert (g.edge_attr[~g.mask.unsqueeze(1).expand_as(g.edge_attr)] == 0).all()
    # Per sample: backbone 0's rows first, then backbone 1's, ...
    for i in range(n):
        assert g.global_slot[i].tolist() == [sum(c[i] for c in counts[:b]) for b in range(num_b)]


def test_bipartite_conv_equals_pyg_on_each_samples_full_graph():
    """GATv2 on the bipartite edges equals PyG's own self-loop handling on the whole per-sample graph."""
    torch.manual_seed(0)
    counts = [[4, 1, 3], [1, 1, 1]]
    x = torch.randn(sum(rows(counts)), 16)
    conv = GATv2Conv(16, 8, heads=2, concat=True, edge_dim=1, add_self_loops=False)
    ei, ea, glob = bipartite_graph(as_counts(counts), W, rows(counts))
    fast = conv((x, x[glob.reshape(-1)]), ei, ea)
    pyg = GATv2Conv(16, 8, heads=2, concat=True, edge_dim=1)  # add_self_loops=True, fill_value='mean'
    pyg.load_state_dict(conv.state_dict())
    # The full graph of the reference: listed self-loops of weight 1 (PyG replaces them), edges into globals.
    full = [(s, int(glob.reshape(-1)[d]), w) for s, d, w in reference_edges(counts) if s != glob.reshape(-1)[d]]
    full += [(v, v, 1.0) for v in range(len(x))]
    index = torch.tensor([[s, d] for s, d, _ in full]).t()
    want = pyg(x, index, torch.tensor([[w] for *_, w in full]))[glob.reshape(-1)]
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-6)


def test_gather_matches_loop():
    torch.manual_seed(0)
    counts = [3, 1, 4, 2, 1, 5]
    samples = [torch.randn(c, 7).half() for c in counts]
    embeds = torch.randn(len(counts), 4)
    packed = PackedFeatures.from_samples(samples, embeds)
    assert len(packed) == 6 and packed.width == 7 and packed.embed_dim == 4
    idx = torch.tensor([4, 0, 5, 5, 1])
    block = packed.gather(idx)
    ref_tokens = torch.cat([samples[i].float() for i in idx.tolist()])
    assert block.tokens.dtype == torch.float32
    assert torch.equal(block.tokens, ref_tokens)
    assert block.counts.tolist() == [counts[i] for i in idx.tolist()]
    assert torch.equal(block.embeds, embeds[idx])
    assert packed.gather(idx, dtype=torch.float16).tokens.dtype == torch.float16
    blocks = gather_batch([packed, packed.to("cpu")], idx, device="cpu")
    assert len(blocks) == 2 and all(isinstance(b, NodeBlock) for b in blocks)
    assert blocks[1].batch_size == 5
    assert packed.gather(torch.tensor([], dtype=torch.long)).tokens.shape == (0, 7)


def test_packed_validation():
    with pytest.raises(ValueError):
        PackedFeatures(torch.zeros(3, 2), torch.tensor([0, 1, 1, 3]), torch.zeros(3, 2))
    with pytest.raises(ValueError):
        PackedFeatures(torch.zeros(3, 2), torch.tensor([0, 3]), torch.zeros(2, 2))


@pytest.mark.parametrize("counts", [[[3, 1, 5, 2], [1, 1, 1, 1]], [[2, 4, 1], [3, 1, 2], [1, 1, 1]]])
def test_dense_layout_maps_slots_to_stacked_rows_and_back(counts):
    """``row`` is the inverse of ``slots`` on the filled slots; global slots hold bipartite_graph's global rows."""
    n = len(counts[0])
    slots = max(sum(c[i] for c in counts) for i in range(n)) + 1
    g = dense_graph(as_counts(counts), W, rows(counts), slots)
    flat = torch.cat(list(g.slots))
    assert torch.equal(g.row.reshape(-1)[flat], torch.arange(sum(rows(counts))))
    assert (g.row[~g.mask] == 0).all()
    _, _, glob = bipartite_graph(as_counts(counts), W, rows(counts))
    assert torch.equal(g.row.gather(1, g.global_slot), glob)
