"""Resolve pretrained weights before any work: local folders/files or the Hugging Face cache; no silent download."""
from __future__ import annotations

import json
from pathlib import Path

from data.backbone_spec import looks_like_path
from data.errors import PipelineError
from extract.backbones.base import missing_weights, named

__all__ = ["hf_cached_file", "hf_snapshot", "load_hf_model"]


def hf_snapshot(repo_id: str, flag: str, download: bool, allow_patterns: list[str] | None = None,
                what: str = "weights") -> str:
    """A local folder for an HF repo id or path: an existing folder, the local HF cache, or (if allowed) a download.
    ``what`` the folder is wanted for names it in messages."""
    path = Path(repo_id).expanduser()
    if path.is_dir():
        return str(path)
    if looks_like_path(repo_id):
        raise PipelineError(f"{named(flag, repo_id)}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=not download, allow_patterns=allow_patterns)
    except LocalEntryNotFoundError:
        raise missing_weights(repo_id, "not in the local Hugging Face cache", flag, what) from None
    except Exception as e:  # network errors, gated or missing repos: one clear line
        raise PipelineError(f"{what} {repo_id} could not be fetched: {type(e).__name__}: {e}") from None


def hf_cached_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """The first of ``filenames`` of ``repo_id`` found in the local HF cache, without network access."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return found
    return None


def load_hf_model(model_cls, folder: str, ref: str, flag: str = "--checkpoint"):
    """``model_cls.from_pretrained(folder)``, refusing a folder of another architecture and any key mismatch."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise PipelineError(f"{named(flag, ref)}: {folder} has no config.json (not a saved transformers model)")
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{named(flag, ref)}: {config} cannot be read ({e})") from None
    expected = model_cls.config_class.model_type
    architectures = saved.get("architectures") or []
    if saved.get("model_type") != expected or (architectures and model_cls.__name__ not in architectures):
        held = ", ".join(map(str, architectures)) or "a model"
        raise PipelineError(f"{named(flag, ref)}: holds {held} of type {saved.get('model_type')!r}, "
                            f"not {model_cls.__name__} ({expected!r})")
    try:
        # Mismatched shapes are reported in `info` (and refused below, by name) rather than raised without them.
        model, info = model_cls.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise PipelineError(f"{named(flag, ref)}: could not load {model_cls.__name__} ({reason})") from None
    bad = [k for k in [*info["missing_keys"], *info["unexpected_keys"]] if not k.endswith("position_ids")]
    bad += [k[0] if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    if bad:  # random weights in place of missing ones would give silently wrong features
        raise PipelineError(f"{named(flag, ref)}: weights do not match {model_cls.__name__} "
                            f"({len(bad)} missing, unexpected or mismatched keys, e.g. {bad[:3]})")
    return model
