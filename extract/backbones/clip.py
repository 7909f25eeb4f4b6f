"""open_clip models (`clip`, `open_clip:<model>`, `clip-tiny`): one global node per sample, patch tokens optional."""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from data.backbone_spec import looks_like_path
from extract.augment import TrainView
from extract.backbones import open_clip_source as source
from extract.backbones import register
from extract.backbones.base import Backbone, BackboneOptions, Encoded, Tokenized, weights_flag
from extract.backbones.open_clip_tokens import check_patch_tokens, patch_grid, pooled_and_patches

# OpenAI weights need QuickGELU; the plain ViT-L-14-336 config with them gives wrong features silently.
DEFAULT_MODEL, DEFAULT_TAG = "ViT-L-14-336-quickgelu", "openai"
# The tiny test/demo architecture, registered with open_clip by name so that its weights load as real ones do.
TINY_MODEL = "hada-clip-tiny"
open_clip.add_model_config(Path(__file__).with_name("model_configs"))


class Clip(Backbone):
    def __init__(self, name: str, model, preprocess, tokenizer, model_name: str, checkpoint: str, tokens: bool,
                 embed_dim: int):
        self.name, self.module, self.preprocess, self.tokenizer = name, model.eval(), preprocess, tokenizer
        self.model_name, self.checkpoint, self.tokens, self.embed_dim = model_name, checkpoint, tokens, embed_dim
        if tokens:
            check_patch_tokens(model.visual, model_name)
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.context_length = model.context_length

    @property
    def patch_grid(self) -> int:
        return patch_grid(self.module.visual) if self.tokens else 0

    def eval_transform(self):
        return self.preprocess

    def train_transform(self):
        # HADA-LAVIS's CLIP training augmentation (not open_clip's own, which crops less): magnitude 7, then
        # the eval transform, as the reference applies it to the augmented image.
        return TrainView(self.image_size, 7, self.preprocess)

    def tokenize(self, captions: list[str]) -> Tokenized:
        # open_clip truncates silently to context_length (incl. special tokens): count it here.
        if hasattr(self.tokenizer, "encode"):  # open_clip's BPE tokenizer: start and end tokens added
            lengths = [len(self.tokenizer.encode(c)) + 2 for c in captions]
        else:  # a Hugging Face tokenizer (SigLIP, ...), after open_clip's own text cleaning
            hf = self.tokenizer.tokenizer
            lengths = [len(ids) for ids in hf([self.tokenizer.clean_fn(c) for c in captions])["input_ids"]]
        truncated = sum(n > self.context_length for n in lengths)
        return Tokenized({"text": self.tokenizer(captions)}, truncated, torch.ones(len(captions), dtype=torch.long))

    def encode_images(self, pixels: torch.Tensor) -> Encoded:
        if not self.tokens:
            proj = self.module.encode_image(pixels)
            return Encoded(proj, proj[:, None, :])
        proj, patches = pooled_and_patches(self.module.visual, pixels)
        if patches.shape[1] != self.patch_grid ** 2:
            raise ValueError(f"{self.name}: got {patches.shape[1]} patch tokens, expected {self.patch_grid ** 2}")
        return Encoded(proj, torch.cat([proj[:, None, :], patches], dim=1))

    def encode_texts(self, inputs: dict[str, torch.Tensor]) -> Encoded:
        proj = self.module.encode_text(inputs["text"])
        return Encoded(proj, proj[:, None, :], torch.ones(len(proj), dtype=torch.long, device=proj.device))

    def describe(self) -> dict:
        return {
            "backbone": self.name, "model": self.model_name, "checkpoint": self.checkpoint,
            "image_size": self.image_size, "embed_dim": self.embed_dim,
            "image_token_dim": self.embed_dim, "text_token_dim": self.embed_dim, "clip_tokens": self.tokens,
            "preprocessing": f"open_clip eval transform {self.image_size}px "
                             f"({' '.join(str(self.preprocess).split())}); "
                             f"context {self.context_length} tokens",
            "open_clip": open_clip.__version__, "torch": torch.__version__,
        }


@register("clip", "open_clip CLIP, default ViT-L/14 at 336 px with the OpenAI weights (QuickGELU); --model for "
                  "another architecture in the same `clip` store (prefer open_clip:<model>)", weights=True,
          model_option=True)
def clip(options: BackboneOptions) -> Clip:
    model_name = options.model or DEFAULT_MODEL
    source.model_config(model_name, "--model")
    return _open_clip("clip", model_name, options.checkpoint or options.weights or DEFAULT_TAG, None, options)


@register("open_clip", "any open_clip model by name, its store named after the spec: open_clip:ViT-L-16-SigLIP2-384"
                       "@webli; @<tag, weights file or folder, hf-hub:id> (default: the model's first tag that fits "
                       "its QuickGELU setting)",
          model=True, weights=True)
def open_clip_model(options: BackboneOptions) -> Clip:
    flag = f"--backbone open_clip:{options.model}"
    source.model_config(options.model, flag)
    ref = options.checkpoint or options.weights or source.default_tag(options.model, flag)
    # A tag in the spec names what a --checkpoint file holds (its preprocessing and QuickGELU check).
    tag = options.weights if options.checkpoint and options.weights and not looks_like_path(options.weights) \
        and not options.weights.startswith("hf-hub:") else None
    return _open_clip("open_clip", options.model, ref, tag, options)


def _open_clip(name: str, model_name: str, ref: str, tag: str | None, options: BackboneOptions) -> Clip:
    flag = weights_flag(f"open_clip:{model_name}" if name == "open_clip" else name, options)
    resolved = source.resolve(model_name, ref, options.download, flag, tag)
    model, preprocess, tokenizer = source.load(resolved, ref, flag)
    return Clip(name, model, preprocess, tokenizer, model_name, ref, options.tokens,
                open_clip.get_model_config(model_name)["embed_dim"])


def open_clip_models() -> dict[str, list[str]]:
    """Every open_clip model name this version knows, with its pretrained tags (empty: weights by file only)."""
    return {m: open_clip.list_pretrained_tags_by_model(m) for m in open_clip.list_models()}


def tiny_clip(seed: int = 0) -> open_clip.CLIP:
    """Same class as `clip`, tiny random-initialised config (fixed seed), no network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(**open_clip.get_model_config(TINY_MODEL))


def tiny_clip_preprocessing() -> tuple:
    """(eval transform, tokenizer) of the tiny architecture: OpenAI mean/std at 32 px, BPE with 24 tokens."""
    preprocess = open_clip.image_transform(32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD)
    return preprocess, open_clip.get_tokenizer(TINY_MODEL)


def random_tiny_clip(name: str, tokens: bool = False) -> Clip:
    """The tiny architecture, random-initialised (seed 0), as the backbone ``name``."""
    embed_dim = open_clip.get_model_config(TINY_MODEL)["embed_dim"]
    return Clip(name, tiny_clip(), *tiny_clip_preprocessing(), "tiny", "random-init(seed=0)", tokens, embed_dim)


@register("clip-tiny", "tiny random-initialised open_clip CLIP (same class) for tests and the demo; no weights")
def clip_tiny(options: BackboneOptions) -> Clip:
    return random_tiny_clip("clip-tiny", options.tokens)


@register("clip-demo", f"the demo's CLIP: the {TINY_MODEL} architecture with weights `pipeline demo` trains "
                       "(shapes view), required: @<folder> or --checkpoint <folder>", weights=True, needs_weights=True)
def clip_demo(options: BackboneOptions) -> Clip:
    from extract.backbones.demo_training import missing_demo_weights

    ref = options.checkpoint or options.weights
    if not ref:
        raise missing_demo_weights("clip-demo")
    return _open_clip("clip-demo", TINY_MODEL, ref, None, options)
