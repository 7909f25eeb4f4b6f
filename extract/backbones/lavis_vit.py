"""The ViT of BLIP and ALBEF (timm's VisionTransformer as LAVIS and both repositories define it) onto transformers'
BlipVisionModel: the key map, the config read off the tensors, and the LayerNorm epsilon they compute with.

Their ViT and BlipVisionModel are the same network: patch convolution, CLS token and learned positions, pre-norm
blocks of one fused qkv attention and a GELU MLP, a final LayerNorm. Both repositories and LAVIS build every one
of those LayerNorms with eps 1e-6 (``partial(nn.LayerNorm, eps=1e-6)``); transformers' BlipVisionConfig defaults
to 1e-5, and the converted Hub checkpoints carry that default.
"""
from __future__ import annotations

import torch

from data.errors import PipelineError
from extract.backbones.key_map import Rule, ignore, tensor

LAVIS_VIT_EPS = 1e-6  # lavis/models/vit.py, BLIP's and ALBEF's models/vit.py: every LayerNorm of the ViT
HEAD_WIDTH = 64  # ViT-B/16 (768 / 12), ViT-L/16 (1024 / 16) and BERT-base: heads are not in the tensors

VIT_RULES = (
    Rule("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    Rule("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    Rule("visual_encoder.patch_embed.proj.{rest}", "vision_model.embeddings.patch_embedding.{rest}"),
    Rule("visual_encoder.blocks.{i}.norm1.{rest}", "vision_model.encoder.layers.{i}.layer_norm1.{rest}"),
    Rule("visual_encoder.blocks.{i}.attn.qkv.{rest}", "vision_model.encoder.layers.{i}.self_attn.qkv.{rest}"),
    Rule("visual_encoder.blocks.{i}.attn.proj.{rest}", "vision_model.encoder.layers.{i}.self_attn.projection.{rest}"),
    Rule("visual_encoder.blocks.{i}.norm2.{rest}", "vision_model.encoder.layers.{i}.layer_norm2.{rest}"),
    Rule("visual_encoder.blocks.{i}.mlp.fc1.{rest}", "vision_model.encoder.layers.{i}.mlp.fc1.{rest}"),
    Rule("visual_encoder.blocks.{i}.mlp.fc2.{rest}", "vision_model.encoder.layers.{i}.mlp.fc2.{rest}"),
    Rule("visual_encoder.norm.{rest}", "vision_model.post_layernorm.{rest}"),
)

# What a retrieval checkpoint holds for training only (BLIP, ALBEF, LAVIS alike).
TRAINING_ONLY = (
    ignore("visual_encoder_m.{rest}", "text_encoder_m.{rest}", "vision_proj_m.{rest}", "text_proj_m.{rest}",
           why="momentum encoders (training only)")
    + ignore("image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue",
             why="contrastive queues (training only)")
    + ignore("temp", why="the contrastive temperature (training only)"))


def layer_count(state: dict, prefix: str) -> int:
    """1 + the highest layer number under ``prefix`` (``prefix{i}.``)."""
    numbers = {int(k[len(prefix):].split(".", 1)[0]) for k in state
               if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(numbers) + 1 if numbers else 0


def vit_config(state: dict, what: str) -> dict:
    """BlipVisionConfig arguments read off a LAVIS/BLIP/ALBEF ``visual_encoder``: width, depth, patch, image size."""
    width = tensor(state, "visual_encoder.cls_token", what).shape[-1]
    patch = tensor(state, "visual_encoder.patch_embed.proj.weight", what).shape[-1]
    positions = tensor(state, "visual_encoder.pos_embed", what).shape[1] - 1
    hidden = tensor(state, "visual_encoder.blocks.0.mlp.fc1.weight", what).shape[0]
    grid = round(positions ** 0.5)
    if grid * grid != positions or width % HEAD_WIDTH:
        raise PipelineError(f"{what}: visual_encoder.pos_embed has {positions} patch positions and width {width}: "
                            f"not a square grid of {HEAD_WIDTH}-wide heads")
    return dict(hidden_size=width, intermediate_size=hidden, num_attention_heads=width // HEAD_WIDTH,
                num_hidden_layers=layer_count(state, "visual_encoder.blocks."), image_size=grid * patch,
                patch_size=patch, layer_norm_eps=LAVIS_VIT_EPS)


def set_layer_norm_eps(module: torch.nn.Module, eps: float) -> None:
    """Every LayerNorm of ``module`` computes with ``eps``, whatever its config said."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.LayerNorm):
            sub.eps = eps
