"""CLIP models through open_clip (`clip`, `clip-tiny`): one global node per sample, patch tokens optional."""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torchvision import transforms as T

from data.errors import PipelineError
from extract.augment import HadaAugment
from extract.backbones import register
from extract.backbones.base import Backbone, BackboneOptions, Encoded, Tokenized, missing_weights
from extract.backbones.weights import hf_cached_file, hf_snapshot, looks_like_path

# OpenAI weights need QuickGELU; the plain ViT-L-14-336 config with them gives wrong features silently.
DEFAULT_MODEL, DEFAULT_TAG = "ViT-L-14-336-quickgelu", "openai"
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class Clip(Backbone):
    def __init__(self, name: str, model: open_clip.CLIP, preprocess, tokenizer, model_name: str,
                 checkpoint: str, tokens: bool):
        self.name, self.module, self.preprocess, self.tokenizer = name, model.eval(), preprocess, tokenizer
        self.model_name, self.checkpoint, self.tokens = model_name, checkpoint, tokens
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.context_length = model.context_length
        normalize = [t for t in preprocess.transforms if isinstance(t, T.Normalize)]
        self.mean, self.std = (normalize[0].mean, normalize[0].std) if normalize else (None, None)

    @property
    def patch_grid(self) -> int:
        return self.module.visual.grid_size[0] if self.tokens else 0

    def eval_transform(self):
        return self.preprocess

    def train_transform(self):
        # HADA-LAVIS's CLIP training augmentation (not open_clip's own, which crops less): RandAugment at 7.
        return HadaAugment(self.image_size, 7, self.mean, self.std)

    def tokenize(self, captions: list[str]) -> Tokenized:
        # open_clip truncates silently to context_length (incl. start and end tokens): count it here.
        truncated = sum(len(self.tokenizer.encode(c)) + 2 > self.context_length for c in captions) \
            if hasattr(self.tokenizer, "encode") else 0
        return Tokenized({"text": self.tokenizer(captions)}, truncated, torch.ones(len(captions), dtype=torch.long))

    def encode_images(self, pixels: torch.Tensor) -> Encoded:
        if not self.tokens:
            proj = self.module.encode_image(pixels)
            return Encoded(proj, proj[:, None, :])
        # VisionTransformer.forward's steps, keeping its patch states: the same numbers as with
        # `output_tokens = True`, without switching that flag on a module other threads may be using.
        visual = self.module.visual
        pooled, patches = visual._pool(visual.transformer(visual._embeds(pixels)))
        # Patch states are after ln_post but unprojected: project them so all image nodes share one width.
        if visual.proj is not None:
            pooled, patches = pooled @ visual.proj, patches @ visual.proj
        return Encoded(pooled, torch.cat([pooled[:, None, :], patches], dim=1))

    def encode_texts(self, inputs: dict[str, torch.Tensor]) -> Encoded:
        proj = self.module.encode_text(inputs["text"])
        return Encoded(proj, proj[:, None, :], torch.ones(len(proj), dtype=torch.long, device=proj.device))

    def describe(self) -> dict:
        embed_dim = self.module.text_projection.shape[-1] if hasattr(self.module, "text_projection") else None
        return {
            "backbone": self.name, "model": self.model_name, "checkpoint": self.checkpoint,
            "image_size": self.image_size, "embed_dim": int(embed_dim) if embed_dim is not None else "",
            "image_token_dim": int(embed_dim) if embed_dim is not None else "", "text_token_dim": int(embed_dim or 0),
            "clip_tokens": self.tokens,
            "preprocessing": f"open_clip eval transform {self.image_size}px "
                             f"({' '.join(str(self.preprocess).split())}); "
                             f"context {self.context_length} tokens",
            "open_clip": open_clip.__version__, "torch": torch.__version__,
        }


def resolve_pretrained(model: str, ref: str, download: bool) -> tuple[str, str | None]:
    """(model name for open_clip, pretrained argument) with weights checked to be local unless download."""
    if ref.startswith("hf-hub:"):
        folder = hf_snapshot(ref[len("hf-hub:"):], "--checkpoint", download, filename="open_clip_config.json")
        return f"local-dir:{folder}", None
    if model not in open_clip.list_models():
        raise PipelineError(f"--model {model!r} is not an open_clip model (see open_clip.list_models())")
    if Path(ref).expanduser().is_file():
        return model, str(Path(ref).expanduser())
    if looks_like_path(ref):
        raise PipelineError(f"--checkpoint {ref}: no such file")
    cfg = open_clip.get_pretrained_cfg(model, ref)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise PipelineError(f"--checkpoint {ref!r} is not a pretrained tag of {model} "
                            f"(known: {', '.join(tags) or 'none'})")
    if download:
        return model, ref
    repo = cfg.get("hf_hub", "").strip("/")
    local = hf_cached_file(repo, HF_WEIGHT_FILES) if repo else None
    if local is None:
        raise missing_weights(f"{model} / {ref}",
                              f"looked in the local Hugging Face cache for {repo or cfg.get('url')}",
                              "--checkpoint /path/to/weights.safetensors")
    return model, local


@register("clip", "open_clip CLIP, default ViT-L/14 at 336 px with the OpenAI weights (QuickGELU)")
def clip(options: BackboneOptions) -> Clip:
    model_name = options.model or DEFAULT_MODEL
    ref = options.checkpoint or DEFAULT_TAG
    name, pretrained = resolve_pretrained(model_name, ref, options.download)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise PipelineError(f"--checkpoint {ref}: could not load into {model_name} ({e})") from None
    tokenizer = open_clip.get_tokenizer(name)
    return Clip("clip", model, preprocess, tokenizer, model_name, ref, options.tokens)


def tiny_clip(seed: int = 0) -> open_clip.CLIP:
    """Same class as `clip`, tiny random-initialised config (fixed seed), no network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(
            embed_dim=24, quick_gelu=True,
            vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
            text_cfg=dict(context_length=24, vocab_size=49408, width=32, heads=2, layers=2))


@register("clip-tiny", "tiny random-initialised open_clip CLIP (same class) for tests and the demo; no weights")
def clip_tiny(options: BackboneOptions) -> Clip:
    model = tiny_clip()
    preprocess = open_clip.image_transform(32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=24)
    return Clip("clip-tiny", model, preprocess, tokenizer, "tiny", "random-init(seed=0)", options.tokens)
