"""HADA's fusion model: a graph-attention encoder per side, momentum copies, queues, ITC + ITM."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATv2Conv

from .batch import NodeBlock
from .graph import EdgeWeights, build_full_graph, build_global_graph
from .losses import id_targets, itc_loss, itm_features, itm_loss, sample_hard_negatives


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters; the defaults are HADA-LAVIS's."""

    width: int = 512
    heads: int = 4
    dropout: float = 0.4
    w_token_own: float = 0.9
    w_token_other: float = 0.7
    w_global: float = 1.1
    w_self: float = 1.0
    undirected: bool = False  # global outputs are the same either way with one layer
    embed_dim: int = 512
    momentum: float = 0.995
    queue_size: int = 65536
    temp: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    weighted: bool = False
    weight_init: float = 0.5
    weight_min: float = 0.1
    weight_max: float = 0.9
    global_only: bool = True  # the bipartite fast path; False runs the full graph

    def __post_init__(self) -> None:
        if min(self.width, self.heads, self.embed_dim, self.queue_size) < 1:
            raise ValueError("width, heads, embed_dim and queue_size must be >= 1")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.momentum <= 1.0:
            raise ValueError("need 0 <= dropout < 1 and 0 <= momentum <= 1")
        if not 0.0 < self.temp_min <= self.temp <= self.temp_max:
            raise ValueError("need 0 < temp_min <= temp <= temp_max")
        if not self.weight_min <= self.weight_init <= self.weight_max:
            raise ValueError("need weight_min <= weight_init <= weight_max")

    @property
    def edge_weights(self) -> EdgeWeights:
        return EdgeWeights(self.w_token_own, self.w_token_other, self.w_global, self.w_self)


class GraphEncoder(nn.Module):
    """One side (images or captions): B backbones' nodes -> one L2-normalised embedding.

    Per backbone a linear map to ``width``; one GATv2 layer over each sample's
    graph (``fuse.graph``); heads merged by a linear, skip connection, GELU,
    LayerNorm, dropout; the B updated global nodes concatenated with every
    backbone's raw retrieval embedding, dropout, a linear to ``embed_dim``.

    With HADA-LAVIS's dims (BLIP 768 tokens / 256 embed, CLIP 768 / 768) and the
    defaults this has 4,994,048 parameters: projections 787,456, GATv2 2,107,392,
    head merge 1,049,088, LayerNorm 1,024, output 1,049,088.
    """

    def __init__(self, token_dims: Sequence[int], embed_dims: Sequence[int],
                 cfg: ModelConfig = ModelConfig()):
        super().__init__()
        if len(token_dims) != len(embed_dims) or len(token_dims) < 1:
            raise ValueError("need one token dim and one embed dim per backbone")
        self.token_dims = list(token_dims)
        self.embed_dims = list(embed_dims)
        self.cfg = cfg
        self.edge_weights = cfg.edge_weights
        w = cfg.width
        self.proj = nn.ModuleList([nn.Linear(d, w) for d in token_dims])
        self.conv = GATv2Conv(w, w, heads=cfg.heads, concat=True, edge_dim=1,
                              add_self_loops=False, share_weights=False)
        self.merge = nn.Linear(cfg.heads * w, w)
        self.norm = nn.LayerNorm(w)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(len(token_dims) * w + sum(embed_dims), cfg.embed_dim)

    @property
    def num_backbones(self) -> int:
        return len(self.token_dims)

    def reset_parameters(self) -> None:
        for lin in self.proj:
            lin.reset_parameters()
        self.conv.reset_parameters()
        self.merge.reset_parameters()
        self.norm.reset_parameters()
        self.out.reset_parameters()

    def forward(self, blocks: Sequence[NodeBlock]) -> Tensor:
        """(batch, embed_dim) float32, unit rows."""
        if len(blocks) != self.num_backbones:
            raise ValueError(f"expected {self.num_backbones} NodeBlocks, got {len(blocks)}")
        n = blocks[0].batch_size
        # Node order is backbone-major, matching fuse.graph.
        x = torch.cat([proj(b.tokens) for proj, b in zip(self.proj, blocks)])
        counts = [b.counts for b in blocks]
        num_rows = [b.tokens.size(0) for b in blocks]
        if self.cfg.global_only:
            # Only the global nodes are read out: attend into them alone.
            edge_index, edge_attr, layout = build_global_graph(
                counts, self.edge_weights, num_rows)
            x_dst = x[layout.global_index.reshape(-1)]
            h = self.conv((x, x_dst), edge_index, edge_attr.to(x.dtype))
        else:
            edge_index, edge_attr, layout = build_full_graph(
                counts, self.edge_weights, self.cfg.undirected, num_rows)
            glob = layout.global_index.reshape(-1)
            x_dst = x[glob]
            # Everything after the conv is per node, so only the read-out nodes need it.
            h = self.conv(x, edge_index, edge_attr.to(x.dtype))[glob]
        h = self.merge(h) + x_dst
        h = self.drop(self.norm(F.gelu(h)))
        h = h.reshape(n, self.num_backbones * self.cfg.width)
        z = torch.cat([h] + [b.embeds.to(h.dtype) for b in blocks], dim=1)
        z = self.out(self.drop(z))
        return F.normalize(z.float(), dim=-1)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(token_dims={self.token_dims}, "
                f"embed_dims={self.embed_dims}, width={self.cfg.width}, "
                f"heads={self.cfg.heads}, embed_dim={self.cfg.embed_dim}, "
                f"global_only={self.cfg.global_only})")


def first_backbone_embeds(blocks: Sequence[NodeBlock]) -> Tensor:
    """The first backbone's own retrieval embeddings, L2-normalised (float32)."""
    return F.normalize(blocks[0].embeds.float(), dim=-1)


class HadaModel(nn.Module):
    """Image and caption encoders, their momentum copies and queues, ITC + ITM.

    Training: ``out = model(image_blocks, text_blocks, image_ids)``;
    ``out["loss"].backward()``. In training mode ``forward`` itself first runs
    ``momentum_update()`` (as ALBEF does; pass ``update_momentum=False`` when the
    training step calls it) and finally enqueues the momentum features; in eval
    mode it changes no state.

    Weighted stage (``cfg.weighted``): every score, the ITC logits included, is
    ``(1 - w) * sim_fused + w * sim_first_backbone``. The queues also hold the
    first backbone's normalised embeddings (always, so a stage-one checkpoint
    loads into stage two with warm queues), and the mix applies to batch and
    queue columns alike. ``w`` always exists (same state_dict in both stages)
    but only requires grad when weighted. Image ids must be >= 0: id -1 marks
    an empty queue slot, left out of the softmax.
    """

    def __init__(self, image_token_dims: Sequence[int], image_embed_dims: Sequence[int],
                 text_token_dims: Sequence[int], text_embed_dims: Sequence[int],
                 cfg: ModelConfig = ModelConfig()):
        super().__init__()
        if cfg.weighted and image_embed_dims[0] != text_embed_dims[0]:
            raise ValueError("weighted similarity needs equal first-backbone embed dims")
        self.cfg = cfg
        self.image_encoder = GraphEncoder(image_token_dims, image_embed_dims, cfg)
        self.text_encoder = GraphEncoder(text_token_dims, text_embed_dims, cfg)
        self.image_encoder_m = copy.deepcopy(self.image_encoder).requires_grad_(False)
        self.text_encoder_m = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.itm_head = nn.Linear(4 * cfg.embed_dim, 1)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.w = nn.Parameter(torch.tensor(cfg.weight_init), requires_grad=cfg.weighted)
        q = cfg.queue_size
        self.register_buffer("image_queue", torch.zeros(cfg.embed_dim, q))
        self.register_buffer("text_queue", torch.zeros(cfg.embed_dim, q))
        self.register_buffer("image_first_queue", torch.zeros(image_embed_dims[0], q))
        self.register_buffer("text_first_queue", torch.zeros(text_embed_dims[0], q))
        self.register_buffer("idx_queue", torch.full((q,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.image_encoder.reset_parameters()
        self.text_encoder.reset_parameters()
        self._copy_to_momentum()
        self.itm_head.reset_parameters()
        with torch.no_grad():
            self.temp.fill_(self.cfg.temp)
            self.w.fill_(self.cfg.weight_init)
        self.reset_queues()

    @torch.no_grad()
    def reset_queues(self) -> None:
        for q in (self.image_queue, self.text_queue, self.image_first_queue,
                  self.text_first_queue, self.queue_ptr):
            q.zero_()
        self.idx_queue.fill_(-1)

    def _pairs(self):
        online = [*self.image_encoder.parameters(), *self.text_encoder.parameters()]
        momentum = [*self.image_encoder_m.parameters(), *self.text_encoder_m.parameters()]
        return online, momentum

    @torch.no_grad()
    def _copy_to_momentum(self) -> None:
        online, momentum = self._pairs()
        torch._foreach_copy_(momentum, online)

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

    def similarity(self, image_emb: Tensor, text_emb: Tensor,
                   image_first_backbone_emb: Optional[Tensor] = None,
                   text_first_backbone_emb: Optional[Tensor] = None) -> Tensor:
        """(n_images, n_texts) scores: cosine of the fused embeddings, mixed with the
        first backbone's cosine when weighted (its embeddings may be raw)."""
        with torch.autocast(image_emb.device.type, enabled=False):
            sim = image_emb.float() @ text_emb.float().t()
            if not self.cfg.weighted:
                return sim
            if image_first_backbone_emb is None or text_first_backbone_emb is None:
                raise ValueError("weighted similarity needs the first backbone's embeddings")
            first = (F.normalize(image_first_backbone_emb.float(), dim=-1)
                     @ F.normalize(text_first_backbone_emb.float(), dim=-1).t())
            return self._mix(sim, first)

    def _mix(self, fused: Tensor, first: Tensor) -> Tensor:
        if not self.cfg.weighted:
            return fused
        w = self.mixing_weight()
        return (1.0 - w) * fused + w * first

    def itc_targets(self, image_ids: Tensor) -> Tensor:
        """ITC targets for a batch against [batch, queue] with the current queue."""
        ids = image_ids.to(self.idx_queue.device, torch.long).reshape(-1)
        return id_targets(ids, torch.cat([ids, self.idx_queue]))

    def forward(self, image_blocks: Sequence[NodeBlock], text_blocks: Sequence[NodeBlock],
                image_ids: Tensor, update_momentum: bool = True) -> dict[str, Tensor]:
        """Losses for a batch of positive pairs (row k of both sides is a pair)."""
        cfg = self.cfg
        ids = image_ids.to(self.idx_queue.device, torch.long).reshape(-1)
        n = ids.numel()
        with torch.no_grad():
            # In place, as ALBEF: keeps the stored values in range too.
            self.temp.clamp_(cfg.temp_min, cfg.temp_max)
            self.w.clamp_(cfg.weight_min, cfg.weight_max)
            if self.training and update_momentum:
                self.momentum_update()

        img = self.image_encoder(image_blocks)
        txt = self.text_encoder(text_blocks)
        img0, txt0 = first_backbone_embeds(image_blocks), first_backbone_embeds(text_blocks)
        with torch.no_grad():
            img_m = self.image_encoder_m(image_blocks)
            txt_m = self.text_encoder_m(text_blocks)
            img_all = torch.cat([img_m, self.image_queue.t()])
            txt_all = torch.cat([txt_m, self.text_queue.t()])
            img0_all = torch.cat([img0, self.image_first_queue.t()])
            txt0_all = torch.cat([txt0, self.text_first_queue.t()])
            all_ids = torch.cat([ids, self.idx_queue])
            targets = id_targets(ids, all_ids)
            valid = (all_ids >= 0).unsqueeze(0)
            same = ids.view(-1, 1) == ids.view(1, -1)

        with torch.autocast(img.device.type, enabled=False):  # similarities in float32
            # The first-backbone products are constants; skip them unless weighted.
            sim_i2t = self._mix(img @ txt_all.t(),
                                img0 @ txt0_all.t() if cfg.weighted else None) / self.temp
            sim_t2i = self._mix(txt @ img_all.t(),
                                txt0 @ img0_all.t() if cfg.weighted else None) / self.temp
            loss_itc = itc_loss(sim_i2t, sim_t2i, targets, valid)
            # Hard negatives from the in-batch block: a caption per image, an image per caption.
            neg_txt, has_neg_txt = sample_hard_negatives(sim_i2t[:, :n], same)
            neg_img, has_neg_img = sample_hard_negatives(sim_t2i[:, :n], same)

        pos_logits = self.itm_head(itm_features(img, txt))
        neg_logits = self.itm_head(itm_features(torch.cat([img, img[neg_img]]),
                                                torch.cat([txt[neg_txt], txt])))
        loss_itm = itm_loss(pos_logits, neg_logits, torch.cat([has_neg_txt, has_neg_img]))

        if self.training:
            self._enqueue(img_m, txt_m, img0, txt0, ids)
        return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm}

    @torch.no_grad()
    def _enqueue(self, img_m: Tensor, txt_m: Tensor, img0: Tensor, txt0: Tensor,
                 ids: Tensor) -> None:
        """Write the batch at the pointer, wrapping around; a batch larger than
        the queue leaves its last ``queue_size`` entries. No host sync."""
        n, q = ids.numel(), self.cfg.queue_size
        keep = min(n, q)
        pos = (self.queue_ptr + torch.arange(n - keep, n, device=ids.device)) % q
        for queue, feats in ((self.image_queue, img_m), (self.text_queue, txt_m),
                             (self.image_first_queue, img0), (self.text_first_queue, txt0)):
            queue[:, pos] = feats[n - keep:].t().to(queue.dtype)
        self.idx_queue[pos] = ids[n - keep:]
        self.queue_ptr.copy_((self.queue_ptr + n) % q)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(image={self.image_encoder!r}, "
                f"text={self.text_encoder!r}, queue_size={self.cfg.queue_size}, "
                f"weighted={self.cfg.weighted})")
