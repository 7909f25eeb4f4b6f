"""HADA's training augmentation (random resized crop, horizontal flip, RandAugment) from an explicit generator.

Each (image, view) is augmented from its own ``torch.Generator``, seeded from the image row and the view,
so a view is the same whichever thread, process or machine decodes it, and decoding threads never share
random state (torchvision's transforms draw from the process-wide generator).
"""
from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op  # the operations torchvision's RandAugment applies

BICUBIC = T.InterpolationMode.BICUBIC


def view_seed(seed: int, row: int, view: int) -> int:
    """One seed per (image, view) so augmented views are identical on every rerun, whatever the worker."""
    return (seed * 1_000_003 + row * 1_009 + view) % (2 ** 63)


def _uniform(gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand(1, generator=gen))


class HadaAugment:
    """PIL image + generator -> normalised tensor: crop of 50-100% of the area (aspect 3/4 to 4/3) resized
    to ``size`` (bicubic), flip with probability 1/2, RandAugment (``ops`` operations at ``magnitude`` of 31
    bins), then ToTensor and Normalize(mean, std)."""

    def __init__(self, size: int, magnitude: int, mean, std, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), ops: int = 2):
        self.size, self.magnitude, self.scale, self.ratio, self.ops = size, magnitude, scale, ratio, ops
        self.bins = 31  # RandAugment's default magnitude scale, as HADA-LAVIS uses it
        # op name -> (magnitude per bin, signed), for the crop's size: read-only, shared by decoding threads
        self.space = T.RandAugment(ops, magnitude, self.bins)._augmentation_space(self.bins, (size, size))
        self.finish = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __repr__(self) -> str:
        return (f"HadaAugment(size={self.size}, scale={self.scale}, ratio=({self.ratio[0]:.3f}, {self.ratio[1]:.3f}), "
                f"flip=0.5, rand_augment={self.ops}x{self.magnitude}/{self.bins}, bicubic)")

    def crop_box(self, width: int, height: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop; after 10 misses, the largest centred crop in the ratio range."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * _uniform(gen, *self.scale)
            aspect = math.exp(_uniform(gen, log_lo, log_hi))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
                return top, left, h, w
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        return (height - h) // 2, (width - w) // 2, h, w

    def rand_augment(self, image: Image.Image, gen: torch.Generator) -> Image.Image:
        names = list(self.space)
        for _ in range(self.ops):
            name = names[int(torch.randint(len(names), (1,), generator=gen))]
            magnitudes, signed = self.space[name]
            magnitude = float(magnitudes[self.magnitude]) if magnitudes.ndim > 0 else 0.0
            if signed and int(torch.randint(2, (1,), generator=gen)):
                magnitude = -magnitude
            image = _apply_op(image, name, magnitude, interpolation=T.InterpolationMode.NEAREST, fill=None)
        return image

    def __call__(self, image: Image.Image, gen: torch.Generator) -> torch.Tensor:
        top, left, h, w = self.crop_box(*image.size, gen)
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=BICUBIC)
        if int(torch.randint(2, (1,), generator=gen)):
            image = F.hflip(image)
        return self.finish(self.rand_augment(image, gen))
