"""Where an open_clip model's weights, preprocessing and tokenizer come from: resolved locally before any work.

A reference is a pretrained tag (``openai``, ``webli``, ...), ``hf-hub:<id>``, or a local weights file or
folder (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``, as the Hub repos hold them).
Preprocessing follows the named tag, else the ``open_clip_config.json`` beside the weights, else the
model's first tag. Models with a Hugging Face tokenizer (SigLIP, SigLIP 2, ...) take it from beside the
weights, else from the local Hugging Face cache. Nothing is downloaded unless ``download``.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import open_clip

from data.backbone_spec import looks_like_path
from data.errors import PipelineError
from extract.backbones.base import missing_weights, named
from extract.backbones.weights import hf_cached_file, hf_snapshot

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
# Architecture fields compared with an open_clip_config.json found beside the weights (absent: not compared,
# except quick_gelu, which changes the features without changing any weight's shape).
ARCHITECTURE_KEYS = ("embed_dim", "vision_cfg.image_size", "vision_cfg.patch_size", "vision_cfg.width",
                     "vision_cfg.layers", "vision_cfg.timm_model_name", "text_cfg.width", "text_cfg.layers",
                     "text_cfg.context_length", "text_cfg.vocab_size")


@dataclass(frozen=True)
class OpenClipSource:
    model: str
    pretrained: str  # a local weights file, or a tag open_clip may download (only with download)
    preprocess: dict = field(default_factory=dict)  # overrides of mean, std, interpolation, resize_mode
    tokenizer: str | None = None  # HF tokenizer folder or id (None: open_clip's own BPE tokenizer, in the wheel)


def model_config(model: str, flag: str) -> dict:
    """The built-in config of an open_clip model name; unknown names fail with the closest known ones."""
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise PipelineError(f"{flag}: {model!r} is not an open_clip model name{hint} (`pipeline backbones` lists them)")
    return cfg


def default_tag(model: str, flag: str) -> str:
    """The model's first pretrained tag whose weights fit its activation (QuickGELU or not): ViT-B-32's first
    tag, openai, needs ViT-B-32-quickgelu, so plain ViT-B-32 defaults to its first non-QuickGELU weights."""
    tags = open_clip.list_pretrained_tags_by_model(model)
    if not tags:
        raise PipelineError(f"{flag}: open_clip knows no pretrained weights for {model}; name a local weights file "
                            f"or folder (open_clip:{model}@/path/to/weights or --checkpoint)")
    quick_gelu = model_config(model, flag).get("quick_gelu", False)
    fitting = [t for t in tags if open_clip.get_pretrained_cfg(model, t).get("quick_gelu", False) == quick_gelu]
    if not fitting:  # every tag needs the other variant: _tag_config says which to use
        _tag_config(model, model_config(model, flag), tags[0], flag)
    return fitting[0]


def resolve(model: str, ref: str, download: bool, flag: str, tag: str | None = None) -> OpenClipSource:
    """Weights, preprocessing and tokenizer for ``model`` from ``ref``; ``tag`` names what a local file holds."""
    cfg = model_config(model, flag)
    if ref.startswith("hf-hub:"):
        return _local(model, cfg, hf_snapshot(ref[len("hf-hub:"):], flag, download), ref, download, flag, tag)
    path = Path(ref).expanduser()
    if path.is_dir() or path.is_file():
        return _local(model, cfg, path, ref, download, flag, tag)
    if looks_like_path(ref):
        raise PipelineError(f"{named(flag, ref)}: no such file or folder")
    pretrained = _tag_config(model, cfg, ref, flag)
    preprocess = {k: pretrained[k] for k in PREPROCESS_KEYS if k in pretrained}
    if download:
        return OpenClipSource(model, ref, preprocess, _tokenizer(cfg, None, download, flag))
    repo = pretrained.get("hf_hub", "").strip("/")
    local = hf_cached_file(repo, WEIGHT_FILES) if repo else None
    if local is None:
        raise missing_weights(f"{model} / {ref}",
                              f"looked in the local Hugging Face cache for {repo or pretrained.get('url')}",
                              "--checkpoint /path/to/open_clip_model.safetensors")
    return OpenClipSource(model, local, preprocess, _tokenizer(cfg, Path(local).parent, download, flag))


def _tag_config(model: str, cfg: dict, tag: str, flag: str) -> dict:
    pretrained = open_clip.get_pretrained_cfg(model, tag)
    if not pretrained:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise PipelineError(f"{named(flag, tag)}: not a pretrained tag of {model} "
                            f"(known: {', '.join(tags) or 'none'}), nor a local file or folder")
    if pretrained.get("quick_gelu", False) != cfg.get("quick_gelu", False):
        need = "with" if pretrained.get("quick_gelu") else "without"
        raise PipelineError(f"{named(flag, tag)}: the {tag} weights were trained {need} QuickGELU but {model} is "
                            f"configured otherwise, which gives wrong features silently; use the "
                            f"{'-quickgelu' if pretrained.get('quick_gelu') else 'plain'} variant of {model}")
    return pretrained


def _local(model: str, cfg: dict, path: Path, ref: str, download: bool, flag: str, tag: str | None) -> OpenClipSource:
    """A weights file, or a folder holding one (an HF Hub repo as downloaded), with what lies beside it."""
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise PipelineError(f"{named(flag, ref)}: no open_clip weights in {folder} "
                            f"(looked for {', '.join(WEIGHT_FILES)})")
    saved = _saved_config(folder, ref, flag)
    if saved.get("model_cfg"):
        diff = [k for k in ARCHITECTURE_KEYS if _differs(_get(cfg, k), _get(saved["model_cfg"], k))]
        if saved["model_cfg"].get("quick_gelu", False) != cfg.get("quick_gelu", False):
            diff.append("quick_gelu")
        if diff:
            raise PipelineError(f"{named(flag, ref)}: holds another architecture than {model} "
                                f"(its open_clip_config.json differs in {', '.join(diff)})")
    if tag is not None:
        pretrained = _tag_config(model, cfg, tag, f"--backbone open_clip:{model}@")  # only that spec names one
    elif saved.get("preprocess_cfg"):
        pretrained = saved["preprocess_cfg"]
    else:
        tags = open_clip.list_pretrained_tags_by_model(model)
        pretrained = open_clip.get_pretrained_cfg(model, tags[0]) if tags else {}
    preprocess = {k: pretrained[k] for k in PREPROCESS_KEYS if k in pretrained}
    return OpenClipSource(model, str(weights), preprocess, _tokenizer(cfg, folder, download, flag))


def _saved_config(folder: Path, ref: str, flag: str) -> dict:
    path = folder / "open_clip_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{named(flag, ref)}: {path} cannot be read ({e})") from None


def _get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        cfg = cfg.get(key) if isinstance(cfg, dict) else None
    return cfg


def _differs(a, b) -> bool:
    return a is not None and b is not None and a != b


def _tokenizer(cfg: dict, beside: Path | None, download: bool, flag: str) -> str | None:
    """Where the model's HF tokenizer is: beside the weights, the local HF cache, or (download) its Hub id."""
    name = cfg["text_cfg"].get("hf_tokenizer_name")
    if not name:
        return None
    if beside is not None and any((beside / f).is_file() for f in TOKENIZER_FILES):
        return str(beside)
    if download:
        return name
    found = hf_cached_file(name, TOKENIZER_FILES)
    if found is None:
        raise missing_weights(f"tokenizer {name}", "not beside the weights nor in the local Hugging Face cache",
                              "--checkpoint (a folder holding the weights and tokenizer files)")
    return str(Path(found).parent)


def load(source: OpenClipSource, ref: str, flag: str):
    """(model, eval preprocess, tokenizer) from a resolved source; weights must load completely."""
    from open_clip.tokenizer import HFTokenizer

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            source.model, pretrained=source.pretrained, require_pretrained=True,
            **{f"image_{k}": v for k, v in source.preprocess.items()})
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        reason = " ".join(str(e).split())[:300]
        raise PipelineError(f"{named(flag, ref)}: could not load into {source.model} ({reason})") from None
    text_cfg = open_clip.get_model_config(source.model)["text_cfg"]
    if source.tokenizer is None:
        return model, preprocess, open_clip.get_tokenizer(source.model)
    try:
        tokenizer = HFTokenizer(source.tokenizer, context_length=text_cfg.get("context_length", 77),
                                tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
    except (OSError, ValueError) as e:
        raise PipelineError(f"{named(flag, ref)}: the tokenizer at {source.tokenizer} cannot be loaded ({e})") from None
    return model, preprocess, tokenizer
