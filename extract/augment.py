"""HADA-LAVIS's training augmentation, for the cached views of training images.

The reference augments each training image afresh on every visit, independently for each backbone:
``RandomResizedCrop(size, scale=(0.5, 1), bicubic)``, a horizontal flip, then LAVIS's ``RandomAugment(2, M)``
(M = 5 for BLIP, 7 for CLIP): two operations drawn with replacement from ``OPS``, each applied with
probability 0.5 at magnitude M on a 0-10 scale (``MAGNITUDES`` below gives each operation's argument). The
operations are PIL's (LAVIS reimplements them with OpenCV "to give PIL's output"; geometric ones use
bilinear sampling and the grey fill (128, 128, 128), shears and translations about the top-left corner).

Every random draw comes from the generator passed in, so a view is a pure function of its seed: identical on
every rerun and in any thread or worker.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
       "TranslateY", "Rotate")
APPLY_PROB = 0.5
MAX_LEVEL = 10
FILL = (128, 128, 128)
TRANSLATE_PIXELS = 10  # LAVIS's translate_const: at M = 10 a translation of 10 pixels


def signed(value: float, rng: np.random.Generator) -> float:
    """LAVIS flips the sign of geometric arguments with probability 0.5."""
    return -value if rng.random() > 0.5 else value


# Argument of each operation at magnitude m (0-10), as LAVIS's level_to_args functions define it.
MAGNITUDES: dict[str, Callable[[float, np.random.Generator], float | None]] = {
    "Identity": lambda m, rng: None,
    "AutoContrast": lambda m, rng: None,
    "Equalize": lambda m, rng: None,
    "Brightness": lambda m, rng: m / MAX_LEVEL * 1.8 + 0.1,
    "Sharpness": lambda m, rng: m / MAX_LEVEL * 1.8 + 0.1,
    "ShearX": lambda m, rng: signed(m / MAX_LEVEL * 0.3, rng),
    "ShearY": lambda m, rng: signed(m / MAX_LEVEL * 0.3, rng),
    "TranslateX": lambda m, rng: signed(m / MAX_LEVEL * TRANSLATE_PIXELS, rng),
    "TranslateY": lambda m, rng: signed(m / MAX_LEVEL * TRANSLATE_PIXELS, rng),
    "Rotate": lambda m, rng: signed(m / MAX_LEVEL * 30, rng),
}


def _affine(image: Image.Image, inverse: tuple[float, ...]) -> Image.Image:
    """``inverse`` maps output point (x, y) to input (a x + b y + c, d x + e y + f), PIL's pixel-centre
    coordinates (pixel i spans [i, i + 1))."""
    return image.transform(image.size, Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR, fillcolor=FILL)


def apply_op(name: str, image: Image.Image, arg: float | None) -> Image.Image:
    """One operation on an RGB image."""
    if name == "Identity":
        return image
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Brightness":
        return ImageEnhance.Brightness(image).enhance(arg)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(image).enhance(arg)
    if name == "ShearX":  # OpenCV's x' = x + s y on pixel indices, inverted; + s/2 moves it to pixel centres
        return _affine(image, (1, -arg, arg / 2, 0, 1, 0))
    if name == "ShearY":
        return _affine(image, (1, 0, 0, -arg, 1, arg / 2))
    if name == "TranslateX":  # forward x' = x - t
        return _affine(image, (1, 0, arg, 0, 1, 0))
    if name == "TranslateY":
        return _affine(image, (1, 0, 0, 0, 1, arg))
    if name == "Rotate":  # counter-clockwise degrees about the centre, as cv2.getRotationMatrix2D
        return image.rotate(arg, resample=Image.Resampling.BILINEAR, fillcolor=FILL)
    raise ValueError(f"unknown augmentation {name!r}")


class RandomAugment:
    """LAVIS's ``RandomAugment(n, magnitude)`` over ``OPS``, drawing from an explicit generator."""

    def __init__(self, n: int = 2, magnitude: float = 5, ops: tuple[str, ...] = OPS):
        unknown = set(ops) - set(MAGNITUDES)
        if unknown:
            raise ValueError(f"unknown augmentations {sorted(unknown)}")
        self.n, self.magnitude, self.ops = n, magnitude, ops

    def plan(self, rng: np.random.Generator) -> list[tuple[str, float | None]]:
        """The operations one call applies, with their arguments (each drawn op kept with APPLY_PROB)."""
        chosen = [self.ops[int(k)] for k in rng.integers(len(self.ops), size=self.n)]
        out = []
        for name in chosen:
            if rng.random() > APPLY_PROB:
                continue
            out.append((name, MAGNITUDES[name](self.magnitude, rng)))
        return out

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for name, arg in self.plan(rng):
            image = apply_op(name, image, arg)
        return image


def resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.5, 1.0),
                     ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop of ``scale`` of the area and aspect ``ratio`` (log-uniform), as
    torchvision's RandomResizedCrop chooses it (10 tries, then the largest centred crop within ``ratio``)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainView:
    """One backbone's training view of an image: random resized crop to ``size`` (bicubic), flip with p 0.5,
    ``RandomAugment(2, magnitude)`` (none when ``magnitude`` is None), then ``finish`` (PIL -> the backbone's
    normalised tensor)."""

    def __init__(self, size: int, magnitude: float | None, finish: Callable[[Image.Image], object]):
        self.size, self.finish = size, finish
        self.augment = RandomAugment(2, magnitude) if magnitude is not None else None

    def __call__(self, image: Image.Image, rng: np.random.Generator):
        left, top, w, h = resized_crop_box(image.width, image.height, rng)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        return self.finish(self.augment(image, rng) if self.augment else image)
