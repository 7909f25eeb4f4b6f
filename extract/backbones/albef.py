"""ALBEF retrieval models (`albef`, `albef-tiny`) on transformers modules.

Checkpoints: the ALBEF repository's ``flickr30k.pth`` / ``mscoco.pth`` and LAVIS's ``albef_retrieval`` files, both the
state dict (bare, or under ``model``) of ALBEF's retrieval model: ``visual_encoder`` (timm's ViT-B/16, LayerNorm eps
1e-6: transformers' BlipVisionModel, extract/backbones/lavis_vit.py), ``text_encoder`` (a BERT-base whose first
``fusion_layer`` layers read the text alone and whose later layers, the only ones with cross-attention, fuse it with
the image for ITM), ``vision_proj``, ``text_proj``, ``itm_head``, momentum copies and queues. Retrieval by ITC uses
the text layers only (``mode='text'``): they load into transformers' BertModel; the fusion layers and the ITM head
are ignored. The ALBEF repository's BERT adds token-type embedding 0 to every token; LAVIS's has no token-type
embeddings, so a checkpoint without them gets zeros (the same sum).

Nodes: the ViT's tokens after its final norm (CLS first) and the text layers' token states ([CLS] first); embeddings:
``vision_proj`` / ``text_proj`` of CLS. Preprocessing is the ALBEF repository's, with which HADA's ALBEF variant
extracted its features (m2man/HADA, ALBEF/run_encode_*.py): images resized to 384 x 384 bicubic with the OpenAI
mean/std; captions through ALBEF's ``pre_caption`` (30 words) and its BERT tokenizer, which writes [CLS] and no
[SEP], 30 tokens at most. (LAVIS evaluates its albef_retrieval with BLIP's caption cleaning and 35 tokens with [SEP].)
"""
from __future__ import annotations

import logging

import torch
import transformers
from torchvision import transforms as T
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer, BlipVisionConfig, BlipVisionModel

from data.errors import PipelineError
from extract.augment import TrainView
from extract.backbones import register
from extract.backbones.base import BackboneOptions, Tokenized, named, weights_flag
from extract.backbones.blip import PROCESSOR_FILES, TwoTowers, tiny_vocabulary
from extract.backbones.blip_pth import is_pth
from extract.backbones.key_map import Rule, apply_rules, ignore, load_mapped, read_state_dict, tensor
from extract.backbones.lavis_vit import HEAD_WIDTH, LAVIS_VIT_EPS, TRAINING_ONLY, VIT_RULES, layer_count, vit_config
from extract.backbones.text import albef_tokenize, check_vocabulary
from extract.backbones.weights import hf_snapshot

log = logging.getLogger("pipeline.extract")
DEFAULT_TOKENIZER = "bert-base-uncased"  # ALBEF's and LAVIS's
MAX_TEXT_TOKENS = 30  # ALBEF's evaluation: padding='max_length', truncation=True, max_length=30
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TOKEN_TYPES = "text_encoder.embeddings.token_type_embeddings.weight"


class AlbefRetrieval(torch.nn.Module):
    """ALBEF's retrieval model for ITC: its ViT, the text layers of its BERT, and the two projections."""

    def __init__(self, vision: BlipVisionConfig, text: BertConfig, embed_dim: int):
        super().__init__()
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BertModel(text, add_pooling_layer=False)
        self.vision_proj = torch.nn.Linear(vision.hidden_size, embed_dim)
        self.text_proj = torch.nn.Linear(text.hidden_size, embed_dim)


def albef_rules(fusion_layer: int) -> tuple[Rule, ...]:
    """The key map of a checkpoint whose BERT fuses from layer ``fusion_layer`` on."""
    text_layer = lambda g: int(g["i"]) < fusion_layer  # noqa: E731
    return VIT_RULES + ignore("text_encoder.embeddings.position_ids", why="position indices (a constant buffer)") + (
        Rule("text_encoder.embeddings.{rest}", "text_encoder.embeddings.{rest}"),
        Rule("text_encoder.encoder.layer.{i}.{rest}", "text_encoder.encoder.layer.{i}.{rest}", when=text_layer),
        Rule("text_encoder.encoder.layer.{i}.{rest}", None, "fusion layers (image-text, for ITM)",
             when=lambda g: not text_layer(g)),
        Rule("vision_proj.{rest}", "vision_proj.{rest}"),
        Rule("text_proj.{rest}", "text_proj.{rest}"),
    ) + ignore("itm_head.{rest}", why="the ITM head (it scores pairs through the fusion layers)") + TRAINING_ONLY


def load_albef_pth(path: str, what: str) -> tuple[AlbefRetrieval, bool]:
    """(the checkpoint's ITC model, whether it has token-type embeddings), every key accounted for."""
    # As ALBEF and LAVIS load them: a BertForMaskedLM's keys (text_encoder.bert.*) are the BertModel's.
    state = {k.replace("text_encoder.bert.", "text_encoder.", 1): v for k, v in read_state_dict(path, what).items()}
    layers = layer_count(state, "text_encoder.encoder.layer.")
    fusion = next((i for i in range(layers) if f"text_encoder.encoder.layer.{i}.crossattention.self.key.weight"
                   in state), layers)
    rules = albef_rules(fusion)
    mapped, ignored = apply_rules(state, rules, what)
    words = tensor(state, "text_encoder.embeddings.word_embeddings.weight", what)
    width, has_types = words.shape[1], TOKEN_TYPES in state
    text = BertConfig(vocab_size=words.shape[0], hidden_size=width, num_hidden_layers=fusion,
                      num_attention_heads=width // HEAD_WIDTH,
                      intermediate_size=tensor(state, "text_encoder.encoder.layer.0.intermediate.dense.weight",
                                               what).shape[0],
                      max_position_embeddings=tensor(state, "text_encoder.embeddings.position_embeddings.weight",
                                                     what).shape[0],
                      type_vocab_size=state[TOKEN_TYPES].shape[0] if has_types else 2, layer_norm_eps=1e-12)
    model = AlbefRetrieval(BlipVisionConfig(**vit_config(state, what)), text,
                           tensor(state, "vision_proj.weight", what).shape[0])
    if not has_types:  # LAVIS's BERT has none: nothing is added
        mapped[TOKEN_TYPES] = torch.zeros(text.type_vocab_size, width)
    load_mapped(model, mapped, rules, what)
    log.info("%s: %d tensors loaded (text layers 0-%d); ignored: %s", what, len(mapped), fusion - 1,
             "; ".join(f"{n} {why}" for why, n in ignored.items()) or "none")
    return model.eval(), has_types


def eval_transform(size: int):
    """ALBEF's test transform: resize to size x size (bicubic), to tensor, OpenAI mean/std."""
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(OPENAI_MEAN, OPENAI_STD)])


class Albef(TwoTowers):
    def __init__(self, name: str, model: AlbefRetrieval, tokenizer, checkpoint: str, token_types: bool,
                 processor_ref: str | None = None, flag: str = "--checkpoint"):
        self.name, self.module, self.tokenizer, self.checkpoint = name, model.eval(), tokenizer, checkpoint
        self.token_types, self.processor_ref = token_types, processor_ref
        vc = model.vision_model.config
        self.image_size, self._grid = vc.image_size, vc.image_size // vc.patch_size
        self.max_length = min(MAX_TEXT_TOKENS, model.text_encoder.config.max_position_embeddings)
        check_vocabulary(tokenizer, model.text_encoder.config.vocab_size,
                         f"--processor {processor_ref}" if processor_ref else named(flag, checkpoint))

    def eval_transform(self):
        return eval_transform(self.image_size)

    def train_transform(self):
        # ALBEF's retrieval training augmentation: crop 0.5-1, flip, RandomAugment(2, 7).
        return TrainView(self.image_size, 7, T.Compose([T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)]))

    def tokenize(self, captions: list[str]) -> Tokenized:
        return albef_tokenize(self.tokenizer, captions, self.max_length)

    def describe(self) -> dict:
        text = self.module.text_encoder.config
        return {
            "backbone": self.name, "model": type(self.module).__name__, "checkpoint": self.checkpoint,
            "image_size": self.image_size, "embed_dim": self.module.vision_proj.out_features,
            "image_token_dim": self.module.vision_model.config.hidden_size, "text_token_dim": text.hidden_size,
            "text_layers": text.num_hidden_layers, "token_type_embeddings": self.token_types,
            "vision_layer_norm_eps": self.module.vision_model.config.layer_norm_eps,
            "preprocessing": f"resize {self.image_size} bicubic, OpenAI mean/std; captions ALBEF-cleaned (30 words), "
                             f"[CLS] without [SEP], max {self.max_length} tokens",
            **({"processor": self.processor_ref} if self.processor_ref else {}),
            "transformers": transformers.__version__, "torch": torch.__version__,
        }


@register("albef", "ALBEF retrieval model (the ALBEF repository's flickr30k.pth / mscoco.pth, or LAVIS's "
                   "albef_retrieval .pt) on transformers modules, required: @<file> or --checkpoint <file>; "
                   f"tokenizer from --processor (default {DEFAULT_TOKENIZER})",
          weights=True, needs_weights=True, processor=True)
def albef(options: BackboneOptions) -> Albef:
    ref = options.checkpoint or options.weights
    if not ref:
        raise PipelineError("albef needs its weights: albef@<flickr30k.pth, mscoco.pth or a LAVIS albef_retrieval "
                            ".pt> or --checkpoint <that file>")
    flag = weights_flag("albef", options)
    if not is_pth(ref):
        raise PipelineError(f"{named(flag, ref)}: albef reads a checkpoint file (.pth or .pt), as ALBEF and LAVIS "
                            f"distribute them")
    model, token_types = load_albef_pth(ref, named(flag, ref))
    processor = options.processor or DEFAULT_TOKENIZER
    folder = hf_snapshot(processor, "--processor", options.download, PROCESSOR_FILES, what="tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise PipelineError(f"--processor {processor}: no tokenizer in {folder} ({e})") from None
    return Albef("albef", model, tokenizer, ref, token_types, processor, flag)


def tiny_albef(seed: int = 0) -> tuple[AlbefRetrieval, BertTokenizer]:
    """Same classes as `albef`, tiny random-initialised config (fixed seed), no network."""
    vocab = tiny_vocabulary()
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=16, layer_norm_eps=LAVIS_VIT_EPS, initializer_range=0.02)
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40, pad_token_id=vocab["[PAD]"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AlbefRetrieval(vision, text, 16)
    return model, BertTokenizer(vocab=vocab, do_lower_case=True)


@register("albef-tiny", "tiny random-initialised ALBEF (same classes) for tests; no weights")
def albef_tiny(options: BackboneOptions) -> Albef:
    model, tokenizer = tiny_albef()
    return Albef("albef-tiny", model, tokenizer, "random-init(seed=0)", True)
