"""The `demo` dataset: synthetic shape scenes with templated captions, generated deterministically (Karpathy format)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.atomic import write_text
from data.progress import Progress

# Bump when rendering or captioning changes, so caches made by older code are regenerated.
GENERATOR_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.12, "large": 0.19}  # radius as a fraction of the side: small is still 24% across
BACKGROUNDS = ("grey", "sky blue", "sand", "striped", "dotted")
POSITIONS = {  # shape centre as fractions of (width, height)
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
# Two-shape scenes use only opposite positions, so the shapes never overlap and the relation is unambiguous.
PAIRS = (("left", "right"), ("top", "bottom"))

POS_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
# Relation of the first shape to the second, keyed by their positions.
RELATIONS = {
    ("left", "right"): ("to the left of", "left of", "next to", "beside"),
    ("right", "left"): ("to the right of", "right of", "next to", "beside"),
    ("top", "bottom"): ("above", "over"),
    ("bottom", "top"): ("below", "under", "beneath"),
}
BG_WORDS = {"grey": ("grey", "gray"), "sky blue": ("sky blue", "light blue"), "sand": ("sand", "sandy"),
            "striped": ("striped",), "dotted": ("dotted", "spotted")}
BG_PREPS = ("on", "against")

# {A}/{B}: noun phrase with article; {An}: without; {pos*}: position phrase; {rel}; {bgp}: "on a grey background";
# {bga}: "a grey".
SINGLE_TEMPLATES = (
    "{A} {pos}",
    "there is {A} {pos}",
    "{A} {pos} {bgp}",
    "{A} {bgp}",
    "{bga} background with {A} {pos}",
    "an image of {A} {pos}",
    "{pos} there is {A}",
    "a single {An} {pos}",
    "a picture of {A} {bgp}",
    "{A} is {pos}",
)
PAIR_TEMPLATES = (
    "{A} {rel} {B}",
    "{A} {rel} {B} {bgp}",
    "there is {A} {rel} {B}",
    "{A} {posA} and {B} {posB}",
    "{bga} background with {A} {rel} {B}",
    "an image of {A} {rel} {B}",
    "{A} is {rel} {B}",
    "a picture of {A} and {B} {bgp}",
    "{posA} there is {A} and {posB} there is {B}",
)
CAPTIONS_PER_IMAGE = 5


def _words(*phrases: str) -> set[str]:
    return {w for p in phrases for w in re.sub(r"\{\w+\}", " ", p).split()}


DEMO_WORDS: tuple[str, ...] = tuple(sorted(
    _words(*SINGLE_TEMPLATES, *PAIR_TEMPLATES, *COLOURS, *SHAPES, *SIZES, *BG_PREPS, "a an background")
    | _words(*(p for v in POS_PHRASES.values() for p in v))
    | _words(*(p for v in RELATIONS.values() for p in v))
    | _words(*(p for v in BG_WORDS.values() for p in v))
))


def demo_dir(data_root: str | os.PathLike) -> Path:
    """Folder holding the demo dataset under a data root."""
    return Path(data_root) / "demo"


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _background(name: str, size: int) -> np.ndarray:
    """Base background as an int16 (H, W, 3) array, so per-image jitter can be added before clipping."""
    yy, xx = np.mgrid[0:size, 0:size]
    if name == "striped":
        period = max(4, size // 16)
        band = ((xx + yy) // period) % 2 == 0
        img = np.where(band[..., None], np.array([190, 190, 190]), np.array([120, 120, 120]))
    elif name == "dotted":
        step, r = max(6, size // 8), max(1, size // 40)
        near = ((xx % step - step // 2) ** 2 + (yy % step - step // 2) ** 2) <= r * r
        img = np.where(near[..., None], np.array([95, 95, 95]), np.array([170, 170, 170]))
    else:
        base = {"grey": (128, 128, 128), "sky blue": (135, 200, 235), "sand": (215, 190, 140)}[name]
        img = np.broadcast_to(np.array(base), (size, size, 3))
    return img.astype(np.int16)


def _random_scene(rng: np.random.Generator, size: int) -> dict:
    """Draw a scene spec: background plus one or two shapes with pixel centres and radii."""
    if rng.random() < 0.5:
        positions = [_pick(rng, tuple(POSITIONS))]
        colours = [_pick(rng, tuple(COLOURS))]
    else:
        positions = list(_pick(rng, PAIRS))
        if rng.random() < 0.5:
            positions.reverse()
        # Distinct colours, so "the red one" and "the blue one" are always distinguishable.
        colours = [str(c) for c in rng.choice(list(COLOURS), size=2, replace=False)]
    shapes = []
    for pos, colour in zip(positions, colours):
        fx, fy = POSITIONS[pos]
        sz = _pick(rng, tuple(SIZES))
        jx, jy = rng.uniform(-0.03, 0.03, size=2)
        shapes.append({
            "shape": _pick(rng, SHAPES), "colour": colour, "size": sz, "position": pos,
            "centre": [int(round((fx + jx) * size)), int(round((fy + jy) * size))],
            "radius": int(round(SIZES[sz] * size)),
        })
    return {"background": _pick(rng, BACKGROUNDS), "shapes": shapes}


def _draw_shape(draw: ImageDraw.ImageDraw, s: dict, rgb: tuple[int, int, int]) -> None:
    (cx, cy), r, kind = s["centre"], s["radius"], s["shape"]
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif kind == "square":
        h = 0.88 * r  # a bit smaller than the circle so the areas look comparable
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif kind == "triangle":
        R = 1.15 * r  # centroid at (cx, cy), so the centre pixel is inside
        draw.polygon([(cx, cy - R), (cx - 0.866 * R, cy + 0.5 * R), (cx + 0.866 * R, cy + 0.5 * R)], fill=rgb)
    elif kind == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.1 * r, 0.5 * r)
        draw.polygon([(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(rad, ang)], fill=rgb)
    elif kind == "cross":
        w = 0.35 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def _render(scene: dict, bases: dict[str, np.ndarray], rng: np.random.Generator) -> Image.Image:
    """Paint the scene; small colour jitter keeps images from being pixel-identical without changing names."""
    bg = bases[scene["background"]] + int(rng.integers(-8, 9))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        jit = rng.integers(-10, 11, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[s["colour"]]) + jit, 0, 255))
        _draw_shape(draw, s, rgb)
    return img


def _noun_phrase(rng: np.random.Generator, s: dict, article: bool = True) -> str:
    words = ([s["size"]] if rng.random() < 0.5 else []) + [s["colour"], s["shape"]]
    return " ".join(([_article(words[0])] if article else []) + words)


def _captions(rng: np.random.Generator, scene: dict) -> list[str]:
    """Five true captions from distinct templates; every caption names every shape's colour and kind."""
    shapes = scene["shapes"]
    if len(shapes) == 2 and rng.random() < 0.5:
        shapes = shapes[::-1]  # either shape may be the subject of the relation
    templates = SINGLE_TEMPLATES if len(shapes) == 1 else PAIR_TEMPLATES
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_IMAGE, replace=False)
    out = []
    for t in chosen:
        bg = _pick(rng, BG_WORDS[scene["background"]])
        slots = {
            "A": _noun_phrase(rng, shapes[0]), "An": _noun_phrase(rng, shapes[0], article=False),
            "pos": _pick(rng, POS_PHRASES[shapes[0]["position"]]),
            "posA": _pick(rng, POS_PHRASES[shapes[0]["position"]]),
            "bgp": f"{_pick(rng, BG_PREPS)} {_article(bg)} {bg} background", "bga": f"{_article(bg)} {bg}",
        }
        if len(shapes) == 2:
            slots.update(B=_noun_phrase(rng, shapes[1]), posB=_pick(rng, POS_PHRASES[shapes[1]["position"]]),
                         rel=_pick(rng, RELATIONS[(shapes[0]["position"], shapes[1]["position"])]))
        out.append(templates[int(t)].format(**slots))
    return out


# What each demo view keeps true; every other attribute is redrawn at random before the captions are written,
# so its words still appear (the captions read like the demo's own) but carry no information.
VIEWS = {
    "colours": "colours, positions and background (shapes and sizes redrawn)",
    "shapes": "shapes, sizes and the number of shapes (colours, positions and background redrawn)",
}


def view_captions(rng: np.random.Generator, scene: dict, view: str) -> list[str]:
    """Captions of ``scene`` as one view sees it: true in the view's attributes, random in the others."""
    shapes = [dict(s) for s in scene["shapes"]]
    seen = dict(scene, shapes=shapes)
    if view == "colours":
        for s in shapes:
            s.update(shape=_pick(rng, SHAPES), size=_pick(rng, tuple(SIZES)))
    elif view == "shapes":
        positions = [_pick(rng, tuple(POSITIONS))] if len(shapes) == 1 else list(_pick(rng, PAIRS))
        if rng.random() < 0.5:
            positions.reverse()
        colours = [str(c) for c in rng.choice(list(COLOURS), size=len(shapes), replace=False)]
        for s, pos, colour in zip(shapes, positions, colours):
            s.update(position=pos, colour=colour)
        seen["background"] = _pick(rng, BACKGROUNDS)
    else:
        raise ValueError(f"unknown demo view {view!r}: choose one of {', '.join(VIEWS)}")
    return _captions(rng, seen)


def demo_scenes(data_root: str | os.PathLike, split: str) -> list[tuple[str, dict]]:
    """(image file, scene) of every image of a split of the generated demo dataset."""
    doc = json.loads((demo_dir(data_root) / "dataset_demo.json").read_text(encoding="utf-8"))
    return [(im["filename"], im["scene"]) for im in doc["images"] if im["split"] == split]


def _is_complete(json_path: Path, params: dict) -> bool:
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f).get("demo_params") == params
    except (OSError, ValueError):
        return False


def generate_demo(data_root: str | os.PathLike, n_train: int = 1500, n_val: int = 250, n_test: int = 250,
                  seed: int = 0, image_size: int = 128) -> Path:
    """Create (or reuse) <data_root>/demo/{dataset_demo.json,images/}; return the json path."""
    root = demo_dir(data_root)
    json_path = root / "dataset_demo.json"
    params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed,
              "image_size": image_size, "version": GENERATOR_VERSION}
    if _is_complete(json_path, params):
        return json_path
    # Drop a stale json first: its presence must only ever mean "images match these parameters".
    json_path.unlink(missing_ok=True)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    bases = {b: _background(b, image_size) for b in BACKGROUNDS}
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    images, sentid = [], 0
    with Progress("demo images", len(splits), unit="image") as progress:
        for imgid, split in enumerate(splits):
            scene = _random_scene(rng, image_size)
            filename = f"demo_{imgid:06d}.jpg"
            _render(scene, bases, rng).save(img_dir / filename, format="JPEG", quality=90, subsampling=0)
            sents = []
            for raw in _captions(rng, scene):
                sents.append({"raw": raw, "tokens": raw.split(), "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append({"filepath": "", "filename": filename, "imgid": imgid, "split": split,
                           "sentences": sents, "sentids": [s["sentid"] for s in sents], "scene": scene})
            progress.update(1)

    # Images left over from a larger earlier generation would confuse anyone listing the folder.
    keep = {im["filename"] for im in images}
    for p in img_dir.glob("demo_*.jpg"):
        if p.name not in keep:
            p.unlink()
    doc = {"dataset": "demo", "demo_params": params, "images": images}
    write_text(json_path, json.dumps(doc, separators=(",", ":")) + "\n")
    return json_path
