"""HADA's fusion model, as HADA-LAVIS computes it: a graph-attention encoder per side, momentum copies,
queues, contrastive (ITC) and matching (ITM) losses.

Reference modules (m2man/HADA-LAVIS): ``Comp_Basic.SeqLinear`` (dropout, then a kaiming-normal linear),
``Comp_Branch.LiFu``/``EnLiFu`` (the encoder), ``Models.MH``/``Discriminator``, ``Controller.forward_batch``
and ``itm_loss`` (the losses).
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATv2Conv

from fuse.attention import Sources, star_gatv2_rows
from fuse.batch import NodeBlock
from fuse.config import ATTENTION, FuseConfig, ModelConfig
from fuse.graph import bipartite_graph, dense_graph
from fuse.losses import QueueSide, itc_loss_against_queues, itm_features, itm_loss, sample_hard_negatives

# Image ids of the queue's initial random entries (never equal to a real id, so never a positive).
EMPTY_ID = -100
DEFAULT = ModelConfig()  # HADA-LAVIS's hyperparameters


class DropLinear(nn.Module):
    """Dropout, then a linear layer with kaiming-normal weights: the reference's one-layer ``SeqLinear``."""

    def __init__(self, d_in: int, d_out: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(d_in, d_out)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.linear.reset_parameters()  # the bias keeps PyTorch's default, as in the reference
        nn.init.kaiming_normal_(self.linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.drop(x))


class GraphEncoder(nn.Module):
    """One side (images or captions): B backbones' nodes -> one L2-normalised embedding.

    1. per backbone b, ``proj[b]``: Linear(d_b, width), no dropout (the reference's ``trans_b``);
    2. one ``GATv2Conv(width, width, heads, concat=True, edge_dim=1, dropout)`` over each sample's graph
       (``fuse.graph``; self-loops as the reference's PyG defaults make them);
    3. ``merge``: dropout, Linear(heads * width, width) (the reference's ``conv_lin``); nothing else with
       one graph layer (its skip, GELU and LayerNorm act only between graph layers);
    4. read out each sample's global nodes g_1..g_B and concatenate [g_1, e_1, ..., e_B, g_2, ..., g_B]
       (e_b: backbone b's raw retrieval embedding; for two backbones the reference's [g1, e1, e2, g2]);
       ``out``: dropout, Linear(-> embed_dim); L2-normalise.

    With ``cfg.reference_bug`` the second backbone's nodes are the first backbone's rows (sample i's come from
    rows cum_i.. of the batch's stacked first-backbone rows), through the second backbone's projection, as
    HADA-LAVIS's ``self.gcn(x_1, x_1, ...)`` computes; its retrieval embedding e_2 is the right one.

    With HADA-LAVIS's dims (BLIP 768 tokens / 256 embed, CLIP 768 / 768) this has 4,993,024 parameters:
    projections 787,456, GATv2 2,107,392, head merge 1,049,088, output 1,049,088.
    """

    def __init__(self, token_dims: Sequence[int], embed_dims: Sequence[int], cfg: ModelConfig = DEFAULT,
                 attention: str = "dense"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
        self.attention = attention
        if len(token_dims) != len(embed_dims) or len(token_dims) < 1:
            raise ValueError("need one token dim and one embed dim per backbone")
        if cfg.reference_bug and (len(token_dims) != 2 or token_dims[0] != token_dims[1]):
            raise ValueError(f"--reference-bug needs exactly two backbones with equal node widths, got {token_dims}")
        self.token_dims, self.embed_dims, self.cfg = list(token_dims), list(embed_dims), cfg
        w = cfg.width
        self.proj = nn.ModuleList([DropLinear(d, w, 0.0) for d in token_dims])
        self.conv = GATv2Conv(w, w, heads=cfg.heads, concat=True, edge_dim=1, dropout=cfg.dropout,
                              add_self_loops=False, share_weights=False)
        self.merge = DropLinear(cfg.heads * w, w, cfg.dropout)
        self.out = DropLinear(len(token_dims) * w + sum(embed_dims), cfg.embed_dim, cfg.dropout)

    @property
    def num_backbones(self) -> int:
        return len(self.token_dims)

    def reset_parameters(self) -> None:
        for module in (*self.proj, self.conv, self.merge, self.out):
            module.reset_parameters()

    def node_tokens(self, blocks: Sequence[NodeBlock]) -> list[Tensor]:
        """The rows each backbone's projection reads (the reference bug, if asked for, applied here)."""
        tokens = [b.tokens for b in blocks]
        if self.cfg.reference_bug:
            rows = tokens[1].size(0)
            if tokens[0].size(0) < rows:
                raise ValueError(f"--reference-bug: the batch has {tokens[0].size(0)} first-backbone rows, "
                                 f"fewer than the second backbone's {rows}")
            tokens[1] = tokens[0][:rows]
        return tokens

    def node_features(self, blocks: Sequence[NodeBlock]) -> tuple[Tensor, Tensor]:
        """Every backbone's projected rows, stacked (backbone 0's, then 1's, ...): (R, width); and the global
        nodes' projections, (N, B, width).

        The global nodes are projected once more from their own rows (N * B rows, little work) rather than
        gathered from the stacked rows, whose gradient would be an (R, width) zero-filled tensor every step.
        """
        tokens = self.node_tokens(blocks)
        nodes = torch.cat([proj(t) for proj, t in zip(self.proj, tokens)])
        first = [b.counts.cumsum(0) - b.counts for b in blocks]  # each sample's global row within its block
        globals_ = torch.stack([proj(t[f]) for proj, t, f in zip(self.proj, tokens, first)], dim=1)
        return nodes, globals_

    def graph(self, blocks: Sequence[NodeBlock]):
        """The batch's graph in the layout ``attend`` takes: the edge list (``fuse.graph.bipartite_graph``) for
        ``attention="pyg"``, else the dense per-sample layout (``fuse.graph.dense_graph``). It depends only on
        the blocks' row counts and the config, so encoders of one config can share it."""
        counts, rows = [b.counts for b in blocks], [b.tokens.size(0) for b in blocks]
        if self.attention == "pyg":
            return bipartite_graph(counts, self.cfg.edge_weights, rows)
        slots = int(torch.stack([b.counts_on_host() for b in blocks]).sum(0).max())
        return dense_graph(counts, self.cfg.edge_weights, rows, slots)

    def attend(self, nodes: Tensor, globals_: Tensor, blocks: Sequence[NodeBlock], graph=None) -> Tensor:
        """(N * B, heads * width): the graph layer's output at every sample's global nodes (sample-major), from
        ``node_features``.

        ``attention="pyg"`` runs ``GATv2Conv.forward`` on the edge list; the dense kinds compute the same from
        the same parameters per sample (``fuse.attention.star_gatv2_rows``), without per-edge width-sized
        tensors, reading the stacked rows where they are (no padded copy). ``graph``: ``self.graph(blocks)``,
        built here if not given.
        """
        graph = self.graph(blocks) if graph is None else graph
        if self.attention == "pyg":
            edge_index, edge_attr, _ = graph
            return self.conv((nodes, globals_.flatten(0, 1)), edge_index, edge_attr.to(nodes.dtype))
        sources = Sources(graph.row, graph.mask, torch.cat(graph.slots))
        out = star_gatv2_rows(self.conv, nodes, sources, globals_, graph.edge_attr, impl=ATTENTION[self.attention])
        return out.reshape(blocks[0].batch_size * self.num_backbones, -1)

    def forward(self, blocks: Sequence[NodeBlock], graph=None) -> Tensor:
        """(batch, embed_dim) float32, unit rows; ``graph`` as ``attend`` takes it."""
        if len(blocks) != self.num_backbones:
            raise ValueError(f"expected {self.num_backbones} NodeBlocks, got {len(blocks)}")
        return self.readout(self.attend(*self.node_features(blocks), blocks, graph), blocks)

    def readout(self, h: Tensor, blocks: Sequence[NodeBlock]) -> Tensor:
        """The graph layer's global-node outputs ``h`` merged, read out as [g1, e1, ..., eB, g2, ..., gB], mapped
        to the fused embedding: (batch, embed_dim) float32, unit rows."""
        n, w = blocks[0].batch_size, self.cfg.width
        g = self.merge(h).reshape(n, self.num_backbones * w)
        embeds = [b.embeds.to(g.dtype) for b in blocks]
        z = torch.cat([g[:, :w], *embeds, g[:, w:]], dim=1)
        return F.normalize(self.out(z).float(), dim=-1)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(token_dims={self.token_dims}, embed_dims={self.embed_dims}, "
                f"width={self.cfg.width}, heads={self.cfg.heads}, embed_dim={self.cfg.embed_dim}, "
                f"attention={self.attention!r})")


def first_backbone_embeds(blocks: Sequence[NodeBlock]) -> Tensor:
    """The first backbone's own retrieval embeddings, L2-normalised (float32): the reference's ``ft_proj_ori_1``."""
    return F.normalize(blocks[0].embeds.float(), dim=-1)


class HadaModel(nn.Module):
    """Image and caption encoders, their momentum copies and queues, ITC + ITM (the reference's ``Controller``).

    Training: ``out = model(image_blocks, text_blocks, image_ids)``; ``out["loss"].backward()``. In training
    mode ``forward`` runs ``momentum_update()`` and finally enqueues the momentum features; in eval mode it
    changes no state.

    Queues start as random unit vectors with image id -100: they take part in the softmax from the first step
    and are never positives. Weighted stage (``cfg.weighted``): the ITC logits, queue columns included, are
    ``(1 - w) * sim_fused + w * sim_first_backbone``; hard negatives for ITM are drawn from the fused
    similarities alone. ``w`` always exists (same state_dict in both stages) but only trains when weighted.
    """

    def __init__(self, image_token_dims: Sequence[int], image_embed_dims: Sequence[int],
                 text_token_dims: Sequence[int], text_embed_dims: Sequence[int], cfg: ModelConfig = DEFAULT,
                 attention: str = "dense"):
        super().__init__()
        if image_embed_dims[0] != text_embed_dims[0]:
            raise ValueError("the first backbone's image and caption embeddings need the same size")
        self.cfg = cfg
        self.impl = ATTENTION[attention]  # the compiled pieces' impl (fuse.compiled), the ITC loss's too
        self.image_encoder = GraphEncoder(image_token_dims, image_embed_dims, cfg, attention)
        self.text_encoder = GraphEncoder(text_token_dims, text_embed_dims, cfg, attention)
        self.image_encoder_m = copy.deepcopy(self.image_encoder).requires_grad_(False)
        self.text_encoder_m = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.itm_head = DropLinear(4 * cfg.embed_dim, 1, cfg.dropout)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.w = nn.Parameter(torch.tensor(cfg.weight_init), requires_grad=cfg.weighted)
        q, first = cfg.queue_size, image_embed_dims[0]
        self.register_buffer("image_queue", torch.empty(cfg.embed_dim, q))
        self.register_buffer("text_queue", torch.empty(cfg.embed_dim, q))
        self.register_buffer("image_first_queue", torch.empty(first, q))
        self.register_buffer("text_first_queue", torch.empty(first, q))
        self.register_buffer("idx_queue", torch.empty(q, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.image_encoder.reset_parameters()
        self.text_encoder.reset_parameters()
        self.copy_to_momentum()
        self.itm_head.reset_parameters()
        self.reset_state()

    @torch.no_grad()
    def reset_state(self) -> None:
        """Temperature, w and queues as at the start of a stage (the reference's stage two resets these)."""
        self.temp.fill_(self.cfg.temp)
        self.w.fill_(self.cfg.weight_init)
        for queue in (self.image_queue, self.text_queue, self.image_first_queue, self.text_first_queue):
            queue.copy_(F.normalize(torch.randn(queue.shape, device=queue.device), dim=0))
        self.idx_queue.fill_(EMPTY_ID)
        self.queue_ptr.zero_()

    def _pairs(self):
        online = [*self.image_encoder.parameters(), *self.text_encoder.parameters()]
        momentum = [*self.image_encoder_m.parameters(), *self.text_encoder_m.parameters()]
        return online, momentum

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        online, momentum = self._pairs()
        torch._foreach_copy_(momentum, online)

    def load_partial(self, weights: dict[str, Tensor], momentum: bool) -> None:
        """Load some of the state (the rest kept); ``momentum``: then copy the online encoders to the momentum
        ones."""
        self.load_state_dict({**self.state_dict(), **weights})
        if momentum:
            self.copy_to_momentum()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA: p_m <- momentum * p_m + (1 - momentum) * p."""
        online, momentum = self._pairs()
        torch._foreach_lerp_(momentum, online, 1.0 - self.cfg.momentum)

    def encode_images(self, blocks: Sequence[NodeBlock]) -> Tensor:
        return self.image_encoder(blocks)

    def encode_texts(self, blocks: Sequence[NodeBlock]) -> Tensor:
        return self.text_encoder(blocks)

    def mixing_weight(self) -> Tensor:
        """``w`` clamped to [weight_min, weight_max]."""
        return self.w.clamp(self.cfg.weight_min, self.cfg.weight_max)

    def learned(self) -> dict[str, float]:
        """The learned scalars as the model uses them: temperature, and w in the weighted stage."""
        return learned_scalars({"temp": self.temp, "w": self.w}, self.cfg)

    def forward(self, image_blocks: Sequence[NodeBlock], text_blocks: Sequence[NodeBlock],
                image_ids: Tensor) -> dict[str, Tensor]:
        """Losses for a batch of positive pairs (row k of both sides is a pair)."""
        cfg = self.cfg
        ids = image_ids.to(self.idx_queue.device, torch.long).reshape(-1)
        with torch.no_grad():
            # In place, as the reference: keeps the stored values in range too.
            self.temp.clamp_(cfg.temp_min, cfg.temp_max)
            self.w.clamp_(cfg.weight_min, cfg.weight_max)
            if self.training:
                self.momentum_update()  # the online parameters are unchanged by the forward: order is free

        # One graph per side, shared by the online and the momentum encoder (the same config and row counts).
        image_graph, text_graph = self.image_encoder.graph(image_blocks), self.text_encoder.graph(text_blocks)
        img = self.image_encoder(image_blocks, image_graph)
        txt = self.text_encoder(text_blocks, text_graph)
        img0, txt0 = first_backbone_embeds(image_blocks), first_backbone_embeds(text_blocks)
        with torch.no_grad():
            img_m = self.image_encoder_m(image_blocks, image_graph)
            txt_m = self.text_encoder_m(text_blocks, text_graph)
            same = ids.view(-1, 1) == ids.view(1, -1)

        with torch.autocast(img.device.type, enabled=False):  # similarities in float32
            # Each side against the other's momentum features and queue; the loss divides by the temperature.
            i2t, t2i = QueueSide(img, txt_m, self.text_queue), QueueSide(txt, img_m, self.image_queue)
            first, w = None, None
            if cfg.weighted:
                w = self.mixing_weight()
                first = QueueSide(img0, txt0, self.text_first_queue), QueueSide(txt0, img0, self.image_first_queue)
            loss_itc, pb_i2t, pb_t2i = itc_loss_against_queues(i2t, t2i, self.temp, ids,
                                                               torch.cat([ids, self.idx_queue]), first, w, self.impl)
            # Hard negatives from the fused in-batch similarities: a caption per image, an image per caption.
            with torch.no_grad():
                neg_txt, has_neg_txt = sample_hard_negatives(pb_i2t / self.temp, same)
                neg_img, has_neg_img = sample_hard_negatives(pb_t2i / self.temp, same)

        # As the reference's itm_loss: the pairs (label 1), then (a hard negative image, each caption) and
        # (each image, a hard negative caption) (label 0).
        pos_logits = self.itm_head(itm_features(img, txt))
        neg_logits = self.itm_head(itm_features(torch.cat([img[neg_img], img]), torch.cat([txt, txt[neg_txt]])))
        loss_itm = itm_loss(pos_logits, neg_logits, torch.cat([has_neg_img, has_neg_txt]))

        if self.training:
            self._enqueue(img_m, txt_m, img0, txt0, ids)
        return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm}

    @torch.no_grad()
    def _enqueue(self, img_m: Tensor, txt_m: Tensor, img0: Tensor, txt0: Tensor, ids: Tensor) -> None:
        """Write the batch at the pointer, wrapping around; a batch larger than the queue leaves its last
        ``queue_size`` entries. No host sync."""
        n, q = ids.numel(), self.cfg.queue_size
        keep = min(n, q)
        pos = (self.queue_ptr + torch.arange(n - keep, n, device=ids.device)) % q
        for queue, feats in ((self.image_queue, img_m), (self.text_queue, txt_m),
                             (self.image_first_queue, img0), (self.text_first_queue, txt0)):
            queue[:, pos] = feats[n - keep:].t().to(queue.dtype)
        self.idx_queue[pos] = ids[n - keep:]
        self.queue_ptr.copy_((self.queue_ptr + n) % q)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(image={self.image_encoder!r}, text={self.text_encoder!r}, "
                f"queue_size={self.cfg.queue_size}, weighted={self.cfg.weighted})")


def learned_scalars(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, float]:
    """Temperature (and w when ``cfg.weighted``) from a model's state, clamped to the ranges the model uses."""
    out = {"temperature": float(state["temp"].detach().clamp(cfg.temp_min, cfg.temp_max))}
    if cfg.weighted:
        out["w"] = float(state["w"].detach().clamp(cfg.weight_min, cfg.weight_max))
    return out


def build_model(dims: dict, cfg: FuseConfig) -> HadaModel:
    """The model for a run's feature dims (``{"image_tokens", "image_embeds", "text_tokens", "text_embeds"}``)."""
    return HadaModel(dims["image_tokens"], dims["image_embeds"], dims["text_tokens"], dims["text_embeds"], cfg.model,
                     cfg.attention)


def model_from_checkpoint(state: dict, cfg: FuseConfig, device) -> HadaModel:
    """The model of a checkpoint's state (``fuse.checkpoint.load``), built for ``cfg`` on ``device``, in eval mode."""
    model = build_model(state["dims"], cfg).to(device)
    model.load_state_dict(state["model"])
    return model.eval()
