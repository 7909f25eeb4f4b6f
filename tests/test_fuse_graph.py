"""fuse.graph against hand-built HADA graphs, global-only vs full graph, PackedFeatures.gather."""
import pytest
import torch
from torch_geometric.nn import GATv2Conv

from fuse.batch import NodeBlock, PackedFeatures, gather_batch
from fuse.graph import EdgeWeights, build_full_graph, build_global_graph

W = EdgeWeights()


pytestmark = pytest.mark.usefixtures("one_thread")


def edge_set(edge_index, edge_attr):
    """Edges as a sorted list of (src, dst, weight) so order does not matter."""
    return sorted((int(s), int(d), round(float(w), 6))
                  for (s, d), w in zip(edge_index.t().tolist(), edge_attr.view(-1).tolist()))


def reference_edges(counts, undirected):
    """HADA's rules, sample by sample with Python loops, mapped to the documented
    backbone-major node order; an independent construction."""
    counts = [list(c) for c in counts]
    num_b, n = len(counts), len(counts[0])
    base = [0]
    for c in counts:
        base.append(base[-1] + sum(c))

    def node(b, i, r):  # row r of sample i of backbone b
        return base[b] + sum(counts[b][:i]) + r

    edges = []
    for i in range(n):
        for b in range(num_b):
            c_b = node(b, i, 0)
            edges.append((c_b, c_b, W.self_loop))
            for b2 in range(num_b):
                if b2 != b:
                    edges.append((c_b, node(b2, i, 0), W.global_global))
            for r in range(1, counts[b][i]):
                f = node(b, i, r)
                edges.append((f, f, W.self_loop))
                for b2 in range(num_b):
                    w = W.token_own if b2 == b else W.token_other
                    edges.append((f, node(b2, i, 0), w))
                    if undirected:
                        edges.append((node(b2, i, 0), f, w))
    return sorted((s, d, round(w, 6)) for s, d, w in edges)


def as_counts(counts):
    return [torch.tensor(c, dtype=torch.long) for c in counts]


def test_two_backbones_literal():
    # Sample: backbone 0 has c0 + 2 tokens (nodes 0, 1, 2), backbone 1 only c1 (node 3).
    ei, ea, layout = build_full_graph(as_counts([[3], [1]]), W, undirected=False)
    expected = sorted([
        (1, 0, 0.9), (2, 0, 0.9),  # tokens -> own global
        (1, 3, 0.7), (2, 3, 0.7),  # tokens -> other global
        (0, 3, 1.1), (3, 0, 1.1),  # global <-> global
        (0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (3, 3, 1.0),  # self-loops
    ])
    assert edge_set(ei, ea) == expected
    assert ea.shape == (len(expected), 1) and ea.dtype == torch.float32
    assert layout.global_index.tolist() == [[0, 3]] and layout.num_nodes == 4
    ei, ea, _ = build_full_graph(as_counts([[3], [1]]), W, undirected=True)
    reverse = [(0, 1, 0.9), (0, 2, 0.9), (3, 1, 0.7), (3, 2, 0.7)]  # global -> tokens
    assert edge_set(ei, ea) == sorted(expected + reverse)


def test_three_backbones_literal():
    # b0: c0=0, f=1; b1: c1=2, f=3, 4; b2: c2=5 (no tokens).
    ei, ea, layout = build_full_graph(as_counts([[2], [3], [1]]), W)
    g = {0: 0, 1: 2, 2: 5}
    expected = [(n, n, 1.0) for n in range(6)]
    expected += [(g[a], g[b], 1.1) for a in g for b in g if a != b]
    expected += [(1, 0, 0.9), (1, 2, 0.7), (1, 5, 0.7)]
    expected += [(t, 2, 0.9) for t in (3, 4)] + [(t, c, 0.7) for t in (3, 4) for c in (0, 5)]
    assert edge_set(ei, ea) == sorted(expected)
    assert layout.global_index.tolist() == [[0, 2, 5]]
    assert layout.backbone_ptr == [0, 2, 5, 6]


@pytest.mark.parametrize("undirected", [False, True])
@pytest.mark.parametrize("counts", [
    [[3, 1, 5, 2], [1, 1, 1, 1]],  # sample 1 has no token nodes at all
    [[2, 4, 1], [3, 1, 2], [1, 1, 1]],
    [[1], [1]],
])
def test_batch_matches_reference(counts, undirected):
    ei, ea, layout = build_full_graph(as_counts(counts), W, undirected=undirected)
    assert edge_set(ei, ea) == reference_edges(counts, undirected)
    n, num_b = len(counts[0]), len(counts)
    assert layout.num_nodes == sum(map(sum, counts))
    assert layout.global_index.shape == (n, num_b)
    expected_batch = [i for c in counts for i, k in enumerate(c) for _ in range(k)]
    assert layout.batch.tolist() == expected_batch
    # The bipartite graph: exactly the full graph's edges into global nodes.
    gi, ga, glayout = build_global_graph(as_counts(counts), W)
    targets = glayout.global_index.reshape(-1)
    mapped = torch.stack([gi[0], targets[gi[1]]])
    into_global = [e for e in reference_edges(counts, undirected) if e[1] in set(targets.tolist())]
    assert edge_set(mapped, ga) == into_global
    assert torch.equal(glayout.global_index, layout.global_index)


def test_custom_weights_and_num_rows():
    w = EdgeWeights(0.1, 0.2, 0.3, 0.4)
    counts = as_counts([[2, 1], [1, 3]])
    ei, ea, _ = build_full_graph(counts, w, num_rows=[3, 4])
    ei2, ea2, _ = build_full_graph(counts, w)
    assert edge_set(ei, ea) == edge_set(ei2, ea2)
    assert {round(float(x), 6) for x in ea.view(-1)} == {0.1, 0.2, 0.3, 0.4}


@pytest.mark.parametrize("undirected", [False, True])
def test_global_only_equals_full_graph(undirected):
    torch.manual_seed(0)
    counts = as_counts([[4, 1, 3, 2, 6], [1, 1, 1, 1, 1], [2, 3, 1, 1, 2]])
    num_nodes = int(sum(c.sum() for c in counts))
    x = torch.randn(num_nodes, 16)
    conv = GATv2Conv(16, 8, heads=2, concat=True, edge_dim=1,
                     add_self_loops=False, share_weights=False)
    ei, ea, layout = build_full_graph(counts, W, undirected=undirected)
    glob = layout.global_index.reshape(-1)
    full = conv(x, ei, ea)[glob]
    gi, ga, glayout = build_global_graph(counts, W)
    fast = conv((x, x[glayout.global_index.reshape(-1)]), gi, ga)
    assert fast.shape == (5 * 3, 16)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    if undirected:  # token outputs do change, so the test above is not vacuous
        directed, _, _ = build_full_graph(counts, W, undirected=False)
        tokens = torch.ones(num_nodes, dtype=torch.bool)
        tokens[glob] = False
        assert not torch.allclose(conv(x, ei, ea)[tokens], conv(x, directed, build_full_graph(
            counts, W)[1])[tokens])


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
