"""ALBEF's retrieval features restated from its equations (ALBEF models/vit.py, models/xbert.py in mode='text',
models/model_retrieval.py), in plain torch on a state dict with ALBEF's own key names: the oracle that
extract/backbones/albef.py is tested against. Not a copy of either code base; for tests only."""
import torch
import torch.nn.functional as F

HEAD = 64  # ALBEF's ViT-B/16 and BERT-base: 64-wide heads


def random_state(vocab: int, width: int = 128, layers: int = 2, fusion: int = 2, image: int = 64, patch: int = 16,
                 positions: int = 40, embed: int = 32, token_types: bool = True, seed: int = 0) -> dict:
    """A random ALBEF retrieval checkpoint in the ALBEF repository's layout: ViT, BERT with ``layers`` text layers
    then ``fusion`` layers with cross-attention, projections, ITM head, momentum copies, queues, temperature."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.1, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    def linear(name, n_out, n_in):
        return {f"{name}.weight": rand(n_out, n_in, std=n_in ** -0.5), f"{name}.bias": rand(n_out)}

    def norm(name, n):
        return {f"{name}.weight": rand(n, mean=1.0), f"{name}.bias": rand(n)}

    s = {"visual_encoder.cls_token": rand(1, 1, width, std=0.5),
         "visual_encoder.pos_embed": rand(1, (image // patch) ** 2 + 1, width, std=0.5),
         "visual_encoder.patch_embed.proj.weight": rand(width, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
         "visual_encoder.patch_embed.proj.bias": rand(width)}
    for i in range(layers):
        b = f"visual_encoder.blocks.{i}"
        s |= norm(f"{b}.norm1", width) | linear(f"{b}.attn.qkv", 3 * width, width)
        s |= linear(f"{b}.attn.proj", width, width) | norm(f"{b}.norm2", width)
        s |= linear(f"{b}.mlp.fc1", 2 * width, width) | linear(f"{b}.mlp.fc2", width, 2 * width)
    s |= norm("visual_encoder.norm", width)
    t = "text_encoder.embeddings"
    s |= {f"{t}.word_embeddings.weight": rand(vocab, width, std=0.5),
          f"{t}.position_embeddings.weight": rand(positions, width, std=0.5),
          f"{t}.position_ids": torch.arange(positions)[None]} | norm(f"{t}.LayerNorm", width)
    if token_types:
        s[f"{t}.token_type_embeddings.weight"] = rand(2, width, std=0.5)
    for i in range(layers + fusion):
        b = f"text_encoder.encoder.layer.{i}"
        for part in ("query", "key", "value"):
            s |= linear(f"{b}.attention.self.{part}", width, width)
        s |= linear(f"{b}.attention.output.dense", width, width) | norm(f"{b}.attention.output.LayerNorm", width)
        if i >= layers:  # ALBEF's fusion layers: cross-attention to the image
            for part in ("query", "key", "value"):
                s |= linear(f"{b}.crossattention.self.{part}", width, width)
            s |= linear(f"{b}.crossattention.output.dense", width, width)
            s |= norm(f"{b}.crossattention.output.LayerNorm", width)
        s |= linear(f"{b}.intermediate.dense", 2 * width, width) | linear(f"{b}.output.dense", width, 2 * width)
        s |= norm(f"{b}.output.LayerNorm", width)
    s |= linear("vision_proj", embed, width) | linear("text_proj", embed, width) | linear("itm_head", 2, width)
    for prefix in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
        s |= {k.replace(prefix, prefix + "_m", 1): v.clone() for k, v in list(s.items()) if k.startswith(prefix + ".")}
    s |= {"image_queue": rand(embed, 16), "text_queue": rand(embed, 16), "idx_queue": torch.full((1, 16), -100),
          "queue_ptr": torch.zeros(1, dtype=torch.long), "temp": torch.tensor(0.07)}
    return s


def _attention(q, k, v, heads, bias=None):
    """Scaled dot-product attention over ``heads`` heads; ``bias`` added to the scores (the padding mask)."""
    b, n, c = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-2, -1) / (c // heads) ** 0.5
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, c)


def _lin(s, name, x):
    return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])


def _ln(s, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], eps)


def vit(s: dict, pixels: torch.Tensor) -> torch.Tensor:
    """ALBEF's VisionTransformer: patches + CLS + positions, pre-norm blocks (eps 1e-6), final norm; B x N x C."""
    w = s["visual_encoder.patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, s["visual_encoder.patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual_encoder.cls_token"].expand(len(x), -1, -1), x], dim=1)
    x = x + s["visual_encoder.pos_embed"][:, : x.shape[1]]
    heads = x.shape[-1] // HEAD
    i = 0
    while f"visual_encoder.blocks.{i}.norm1.weight" in s:
        b = f"visual_encoder.blocks.{i}"
        q, k, v = _lin(s, f"{b}.attn.qkv", _ln(s, f"{b}.norm1", x, 1e-6)).chunk(3, dim=-1)
        x = x + _lin(s, f"{b}.attn.proj", _attention(q, k, v, heads))
        x = x + _lin(s, f"{b}.mlp.fc2", F.gelu(_lin(s, f"{b}.mlp.fc1", _ln(s, f"{b}.norm2", x, 1e-6))))
        i += 1
    return _ln(s, "visual_encoder.norm", x, 1e-6)


def bert_text(s: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ALBEF's BERT in mode='text': embeddings (word + position + token type 0 when it has them), then the layers
    without cross-attention (those before the fusion layer), eps 1e-12, padding masked with -10000; B x L x C."""
    t = "text_encoder.embeddings"
    x = s[f"{t}.word_embeddings.weight"][ids] + s[f"{t}.position_embeddings.weight"][: ids.shape[1]]
    if f"{t}.token_type_embeddings.weight" in s:
        x = x + s[f"{t}.token_type_embeddings.weight"][0]
    x = _ln(s, f"{t}.LayerNorm", x, 1e-12)
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    heads = x.shape[-1] // HEAD
    i = 0
    while f"text_encoder.encoder.layer.{i}.attention.self.query.weight" in s and \
            f"text_encoder.encoder.layer.{i}.crossattention.self.query.weight" not in s:
        b = f"text_encoder.encoder.layer.{i}"
        q, k, v = (_lin(s, f"{b}.attention.self.{p}", x) for p in ("query", "key", "value"))
        x = _ln(s, f"{b}.attention.output.LayerNorm", _lin(s, f"{b}.attention.output.dense",
                                                            _attention(q, k, v, heads, bias)) + x, 1e-12)
        x = _ln(s, f"{b}.output.LayerNorm", _lin(s, f"{b}.output.dense", F.gelu(_lin(s, f"{b}.intermediate.dense", x)))
                + x, 1e-12)
        i += 1
    return x


def features(s: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Image tokens and projection of CLS, text tokens and projection of [CLS], as ALBEF's evaluation computes them."""
    image, text = vit(s, pixels), bert_text(s, ids, mask)
    return {"image_tokens": image, "image_proj": _lin(s, "vision_proj", image[:, 0]),
            "text_tokens": text, "text_proj": _lin(s, "text_proj", text[:, 0])}
