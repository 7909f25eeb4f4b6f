"""Resolve pretrained weights before any work: local folders/files or the Hugging Face cache; no silent download."""
from __future__ import annotations

from pathlib import Path

from data.errors import PipelineError
from extract.backbones.base import missing_weights


def looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).suffix in {".pt", ".pth", ".bin", ".safetensors"}


def hf_snapshot(repo_id: str, flag: str, download: bool, filename: str = "config.json") -> str:
    """A local folder for an HF repo id or path: an existing folder, the local HF cache, or (if allowed) a download."""
    path = Path(repo_id).expanduser()
    if path.is_dir():
        return str(path)
    if looks_like_path(repo_id):
        raise PipelineError(f"{flag} {repo_id}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=not download)
    except LocalEntryNotFoundError:
        raise missing_weights(repo_id, "not in the local Hugging Face cache", flag) from None
    except Exception as e:  # network errors, gated or missing repos: one clear line
        raise PipelineError(f"weights {repo_id} could not be fetched: {type(e).__name__}: {e}") from None


def hf_cached_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """The first of ``filenames`` of ``repo_id`` found in the local HF cache, without network access."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return found
    return None
