"""Tests for the generated demo dataset: determinism, reuse, Karpathy format, and captions matching pixels."""
import json

import numpy as np
import pytest
from PIL import Image

from data.demo import COLOURS, DEMO_WORDS, generate_demo

SMALL = dict(n_train=30, n_val=10, n_test=10, image_size=96)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_root")
    path = generate_demo(root, **SMALL)
    return path, json.loads(path.read_text())


def test_deterministic(tmp_path, demo):
    path_a, _ = demo
    path_b = generate_demo(tmp_path, **SMALL)
    assert path_a.read_bytes() == path_b.read_bytes()
    for im in json.loads(path_b.read_text())["images"]:
        a = (path_a.parent / "images" / im["filename"]).read_bytes()
        assert a == (path_b.parent / "images" / im["filename"]).read_bytes()


def test_reuse_does_not_rewrite(tmp_path):
    path = generate_demo(tmp_path, **SMALL)
    first = path.parent / "images" / "demo_000000.jpg"
    stamps = (path.stat().st_mtime_ns, first.stat().st_mtime_ns)
    assert generate_demo(tmp_path, **SMALL) == path
    assert (path.stat().st_mtime_ns, first.stat().st_mtime_ns) == stamps


def test_parameter_change_regenerates(tmp_path):
    generate_demo(tmp_path, **SMALL)
    path = generate_demo(tmp_path, **{**SMALL, "n_train": 5, "seed": 1})
    doc = json.loads(path.read_text())
    assert doc["demo_params"]["seed"] == 1 and len(doc["images"]) == 25
    # Images from the larger earlier generation are gone.
    assert len(list((path.parent / "images").glob("*.jpg"))) == 25


def test_interrupted_generation_is_redone(tmp_path):
    path = generate_demo(tmp_path, **SMALL)
    path.unlink()  # as if killed before the json was written
    (path.parent / "images" / "demo_000003.jpg").write_bytes(b"truncated")
    generate_demo(tmp_path, **SMALL)
    assert path.exists()
    Image.open(path.parent / "images" / "demo_000003.jpg").load()


def test_karpathy_format_and_splits(demo):
    path, doc = demo
    assert doc["dataset"] == "demo"
    imgs = doc["images"]
    counts = {s: sum(im["split"] == s for im in imgs) for s in ("train", "val", "test")}
    assert counts == {"train": 30, "val": 10, "test": 10}
    sentids = []
    for i, im in enumerate(imgs):
        assert im["imgid"] == i and im["filepath"] == ""
        assert len(im["sentences"]) == 5 and len({s["raw"] for s in im["sentences"]}) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == i and s["tokens"] == s["raw"].split()
        sentids += im["sentids"]
        with Image.open(path.parent / "images" / im["filename"]) as img:
            assert img.mode == "RGB" and img.size == (96, 96)
    assert sentids == list(range(len(sentids)))


def test_captions_use_only_demo_words(demo):
    vocab = set(DEMO_WORDS)
    assert list(DEMO_WORDS) == sorted(vocab) and len(vocab) < 150
    for im in demo[1]["images"]:
        for s in im["sentences"]:
            assert s["raw"] == " ".join(s["tokens"]) and set(s["tokens"]) <= vocab, s["raw"]


def test_captions_name_the_colours_seen_at_shape_centres(demo):
    path, doc = demo
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=float)
    for im in doc["images"]:
        pixels = np.asarray(Image.open(path.parent / "images" / im["filename"]), dtype=float)
        for shape in im["scene"]["shapes"]:
            x, y = shape["centre"]
            rgb = pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
            nearest = names[int(np.argmin(((palette - rgb) ** 2).sum(1)))]
            assert nearest == shape["colour"], (im["filename"], shape, rgb)
            for s in im["sentences"]:
                assert shape["colour"] in s["tokens"] and shape["shape"] in s["tokens"], s["raw"]


def test_two_shape_relation_words_are_true(demo):
    left_words = {"to the left of", "left of"}
    for im in demo[1]["images"]:
        shapes = im["scene"]["shapes"]
        if len(shapes) != 2 or {sh["position"] for sh in shapes} != {"left", "right"}:
            continue
        left = next(sh for sh in shapes if sh["position"] == "left")
        right = next(sh for sh in shapes if sh["position"] == "right")
        assert left["centre"][0] < right["centre"][0]
        for s in im["sentences"]:
            raw = s["raw"]
            # "X to the left of Y": X's colour word comes before the relation.
            for rel in left_words:
                if f" {rel} " in raw and "right of" not in raw:
                    head = raw.split(f" {rel} ")[0].split()
                    assert left["colour"] in head, raw


def test_view_captions_are_true_only_in_their_view(demo):
    """The colours view keeps colours and positions and scrambles shapes; the shapes view the reverse."""
    from data.demo import POS_PHRASES, SHAPES, view_captions

    rng = np.random.default_rng(0)
    wrong_shapes = wrong_colours = 0
    for im in demo[1]["images"]:
        scene, shapes = im["scene"], im["scene"]["shapes"]
        for raw in view_captions(rng, scene, "colours"):
            words = raw.split()
            assert all(s["colour"] in words for s in shapes), raw
            other = [p for pos, ps in POS_PHRASES.items() if pos not in {s["position"] for s in shapes} for p in ps]
            assert not any(p in raw for p in other), raw  # no position but the true ones
            wrong_shapes += any(s["shape"] not in words for s in shapes)
            assert sum(w in SHAPES for w in words) == len(shapes), raw
        for raw in view_captions(rng, scene, "shapes"):
            words = raw.replace("sky blue", "").replace("light blue", "").split()  # background names, not colours
            assert all(s["shape"] in words for s in shapes) and sum(w in COLOURS for w in words) == len(shapes), raw
            wrong_colours += any(s["colour"] not in words for s in shapes)
    n = 5 * len(demo[1]["images"])
    assert 0.5 * n < wrong_shapes and 0.5 * n < wrong_colours  # the other half is redrawn, mostly to other values
    with pytest.raises(ValueError, match="unknown demo view"):
        view_captions(rng, demo[1]["images"][0]["scene"], "sizes")
