"""HADA-LAVIS's encoder restated from its equations, with its module names (so its ``state_dict`` has the
reference checkpoint's key layout): the test oracle for fuse/model.py and fuse/hada_import.py.

It computes as the reference does, batch-wise: each sample's nodes are [backbone-1 rows, backbone-2 rows]
(``concat_node``), its edge list is the one ``Utils.Retrieval_Dataset`` builds (token -> own global 0.9,
token -> other global 0.7, global <-> global 1.1, self-loops 1.0 on every node), the GATv2Conv keeps PyG's
defaults (``add_self_loops=True, fill_value='mean'``), and the global nodes are read back per sample
(``unconcat_node``). ``bug=True`` feeds the first backbone's rows to both projections, as ``EnLiFu.forward``
does (``self.gcn(x_1, x_1, ...)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATv2Conv


class SeqLinear1(nn.Module):
    """A one-layer ``SeqLinear``: dropout, then linear (keys ``linear.0.*``)."""

    def __init__(self, d_in, d_out, dropout):
        super().__init__()
        self.linear = nn.ModuleList([nn.Linear(d_in, d_out)])
        self.dropout = nn.ModuleList([nn.Dropout(dropout)])

    def forward(self, x):
        return self.linear[0](self.dropout[0](x))


class GraphLayer1(nn.Module):
    def __init__(self, width, heads, dropout):
        super().__init__()
        self.conv = nn.ModuleList([GATv2Conv(width, width, heads=heads, concat=True, edge_dim=1, dropout=dropout)])
        self.conv_lin = nn.ModuleList([SeqLinear1(heads * width, width, dropout)])

    def forward(self, x, edge_index, edge_attr):
        return self.conv_lin[0](self.conv[0](x, edge_index, edge_attr.view(-1, 1)))


class LiFu(nn.Module):
    def __init__(self, d1, d2, width, heads, dropout):
        super().__init__()
        self.trans_1 = SeqLinear1(d1, width, 0.0)
        self.trans_2 = SeqLinear1(d2, width, 0.0)
        self.gcn = GraphLayer1(width, heads, dropout)


class EnLiFu(nn.Module):
    def __init__(self, d1, d2, e1, e2, width, heads, embed, dropout):
        super().__init__()
        self.gcn = LiFu(d1, d2, width, heads, dropout)
        self.lin = SeqLinear1(2 * width + e1 + e2, embed, dropout)


class MH(nn.Module):
    """One side's encoder (``Models.MH``); ``forward`` returns the L2-normalised embeddings (the Controller
    normalises with ``l2_norm: True``)."""

    def __init__(self, d1, d2, e1, e2, width=512, heads=4, embed=512, dropout=0.4):
        super().__init__()
        self.enc = EnLiFu(d1, d2, e1, e2, width, heads, embed, dropout)

    def forward(self, x1, x2, n1, n2, e1, e2, bug=False):
        lifu = self.enc.gcn
        h1 = lifu.trans_1(x1)
        h2 = lifu.trans_2(x1 if bug else x2)  # the bug: second backbone's rows taken from x1
        nodes, edges, attrs, first, second = [], [], [], [], []
        c1 = c2 = base = 0
        for i in range(len(n1)):
            a, b = int(n1[i]), int(n2[i])
            nodes += [h1[c1:c1 + a], h2[c2:c2 + b]]
            g1, g2 = base, base + a
            tokens = range(base + 1, base + a)
            listed = [(t, g1, 0.9) for t in tokens] + [(t, g2, 0.7) for t in tokens]  # f1 -> c1, f1 -> c2
            listed += [(g1, g2, 1.1), (g2, g1, 1.1)]  # c1 <-> c2
            listed += [(v, v, 1.0) for v in [*tokens, g1, g2]]  # self-loops (PyG replaces them)
            edges += [(s, d) for s, d, _ in listed]
            attrs += [w for *_, w in listed]
            first.append(g1)
            second.append(g2)
            c1, c2, base = c1 + a, c2 + b, base + a + b
        x = torch.cat(nodes)
        edge_index = torch.tensor(edges, dtype=torch.long).t()
        out = lifu.gcn(x, edge_index, torch.tensor(attrs, dtype=x.dtype))
        z = torch.cat([out[first], e1, e2, out[second]], dim=1)
        return F.normalize(self.enc.lin(z), dim=1)


class Discriminator(nn.Module):
    def __init__(self, embed=512, dropout=0.4):
        super().__init__()
        self.disc = SeqLinear1(4 * embed, 1, dropout)


def reference_checkpoint(img: MH, cap: MH, disc: Discriminator, temp: float, weight_1) -> dict:
    """A dict laid out as HADA-LAVIS's ``Controller.save_model`` writes ``best.pth.tar``."""
    import numpy as np

    return {"epoch": 7, "img_encoder": img.state_dict(), "cap_encoder": cap.state_dict(),
            "discriminator": disc.state_dict(), "temp_para": nn.Parameter(torch.tensor(temp)),
            "weight_1": weight_1, "best_loss": np.float64(4.2)}
