"""Reader: image rows of a split -> decoded, preprocessed tensors, in parallel DataLoader workers."""
from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

# A truncated JPEG must fail, not decode as grey: PIL's default already refuses, keep it so.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_rgb(path: Path) -> Image.Image:
    """Decode fully (so truncated files fail here) and convert grayscale, CMYK, palette and alpha to RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")


def view_rng(seed: int, row: int, view: int, backbone: str) -> np.random.Generator:
    """One generator per (image, view, backbone): a view is identical on every rerun, whatever the worker or
    thread, and each backbone's view k is augmented independently (the reference crops each backbone's input
    on its own)."""
    return np.random.default_rng([seed, row, view, zlib.crc32(backbone.encode())])


class ImageRows(torch.utils.data.Dataset):
    """Items are (row, view, pixels or None, error or None); view 0 is the clean eval transform."""

    def __init__(self, paths: list[Path], rows: list[int], views: int, eval_tf, train_tf, seed: int = 0,
                 backbone: str = ""):
        self.paths, self.rows, self.views = paths, rows, views
        self.eval_tf, self.train_tf, self.seed, self.backbone = eval_tf, train_tf, seed, backbone

    def __len__(self) -> int:
        return len(self.rows) * (self.views + 1)

    def __getitem__(self, i: int):
        k, view = divmod(i, self.views + 1)
        row = self.rows[k]
        try:
            image = load_rgb(self.paths[k])
        except Exception as e:  # any decode failure is reported by name, never silently skipped
            return row, view, None, f"{self.paths[k]}: {type(e).__name__}: {e}"
        if view == 0:
            return row, view, self.eval_tf(image), None
        return row, view, self.train_tf(image, view_rng(self.seed, row, view, self.backbone)), None


def collate(items):
    """Stack the good images; pass failures through by name."""
    good = [it for it in items if it[2] is not None]
    bad = [(it[0], it[3]) for it in items if it[2] is None]
    rows = torch.tensor([it[0] for it in good], dtype=torch.long)
    views = torch.tensor([it[1] for it in good], dtype=torch.long)
    pixels = torch.stack([it[2] for it in good]) if good else None
    return rows, views, pixels, bad


def image_loader(dataset: ImageRows, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)
