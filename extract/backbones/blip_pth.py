"""A LAVIS or BLIP-repository retrieval checkpoint (``blip_coco_retrieval.pth``, ``model_base_retrieval_coco.pth``, ...)
onto transformers' BlipForImageTextRetrieval.

Both code bases save ``{"model": state_dict}`` of their ``BlipRetrieval``/``BLIP_Retrieval``: ``visual_encoder.*``
(timm's ViT: extract/backbones/lavis_vit.py), ``text_encoder.*`` (their BERT, whose names transformers' BlipTextModel
keeps), ``vision_proj``, ``text_proj``, ``itm_head``, plus momentum copies, queues and the temperature, which are
ignored. The config (widths, depths, image size, vocabulary) is read off the tensors. A ``.pth`` holds no tokenizer
or image processor: they come from a transformers BLIP folder (``--processor``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import BlipConfig, BlipForImageTextRetrieval

from extract.backbones.key_map import Rule, apply_rules, ignore, load_mapped, read_state_dict, tensor
from extract.backbones.lavis_vit import HEAD_WIDTH, TRAINING_ONLY, VIT_RULES, layer_count, vit_config

log = logging.getLogger("pipeline.extract")
PTH_SUFFIXES = (".pth", ".pt")

BLIP_RULES = VIT_RULES + ignore("text_encoder.embeddings.position_ids", why="position indices (a constant buffer)") + (
    Rule("text_encoder.{rest}", "text_encoder.{rest}"),
    Rule("vision_proj.{rest}", "vision_proj.{rest}"),
    Rule("text_proj.{rest}", "text_proj.{rest}"),
    Rule("itm_head.{rest}", "itm_head.{rest}"),
) + TRAINING_ONLY


def is_pth(ref: str) -> bool:
    """True for a reference to a single PyTorch checkpoint file (not a transformers folder or Hub id)."""
    return Path(ref).suffix in PTH_SUFFIXES


def blip_config(state: dict, what: str) -> BlipConfig:
    """BlipForImageTextRetrieval's config read off the tensors (vision eps: BLIP's 1e-6)."""
    def shape(key: str) -> torch.Size:
        return tensor(state, "text_encoder." + key, what).shape

    vocab, width = shape("embeddings.word_embeddings.weight")
    text = dict(vocab_size=vocab, hidden_size=width, num_attention_heads=width // HEAD_WIDTH,
                max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
                intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0],
                encoder_hidden_size=shape("encoder.layer.0.crossattention.self.key.weight")[1],
                num_hidden_layers=layer_count(state, "text_encoder.encoder.layer."))
    return BlipConfig(vision_config=vit_config(state, what), text_config=text,
                      image_text_hidden_size=tensor(state, "vision_proj.weight", what).shape[0])


def load_blip_pth(path: str, what: str) -> BlipForImageTextRetrieval:
    """The checkpoint's retrieval model, every key accounted for (``what`` names it in messages)."""
    state = read_state_dict(path, what)
    mapped, ignored = apply_rules(state, BLIP_RULES, what)
    model = BlipForImageTextRetrieval(blip_config(state, what))
    load_mapped(model, mapped, BLIP_RULES, what)
    log.info("%s: %d tensors loaded; ignored: %s", what, len(mapped),
             "; ".join(f"{n} {why}" for why, n in ignored.items()) or "none")
    return model.eval()
