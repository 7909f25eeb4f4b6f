"""extract.augment: HADA-LAVIS's training augmentation (LAVIS RandomAugment op set, probabilities,
magnitudes), seeded views, independent per backbone."""
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from extract.augment import APPLY_PROB, MAGNITUDES, OPS, RandomAugment, TrainView, apply_op, resized_crop_box
from extract.reader import view_rng

LAVIS_OPS = {"Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
             "TranslateY", "Rotate"}


def picture(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_op_set_and_draw_probabilities():
    """Two ops drawn uniformly with replacement from the 10 LAVIS ops; each applied with probability 0.5."""
    assert set(OPS) == LAVIS_OPS and len(OPS) == 10 and APPLY_PROB == 0.5
    aug, rng, trials = RandomAugment(2, 5), np.random.default_rng(0), 20000
    applied, per_call = Counter(), []
    for _ in range(trials):
        plan = aug.plan(rng)
        per_call.append(len(plan))
        applied.update(name for name, _ in plan)
    # E[ops applied per call] = 2 * 0.5; P(0, 1, 2) = 1/4, 1/2, 1/4
    counts = np.bincount(per_call, minlength=3) / trials
    np.testing.assert_allclose(counts, [0.25, 0.5, 0.25], atol=0.015)
    share = np.array([applied[name] for name in OPS]) / sum(applied.values())
    np.testing.assert_allclose(share, 0.1, atol=0.01)


@pytest.mark.parametrize("magnitude,brightness,shear,translate,rotate", [(5, 1.0, 0.15, 5, 15), (7, 1.36, 0.21, 7, 21)])
def test_magnitudes_on_lavis_0_to_10_scale(magnitude, brightness, shear, translate, rotate):
    rng = np.random.default_rng(0)
    assert MAGNITUDES["Brightness"](magnitude, rng) == pytest.approx(brightness)
    assert MAGNITUDES["Sharpness"](magnitude, rng) == pytest.approx(brightness)
    for name, size in (("ShearX", shear), ("ShearY", shear), ("TranslateX", translate), ("Rotate", rotate)):
        values = {round(MAGNITUDES[name](magnitude, rng), 6) for _ in range(200)}
        assert values == {round(size, 6), round(-size, 6)}, name  # both signs, equally often in expectation


def test_ops_do_what_they_name():
    img = picture()
    a = np.asarray(img).astype(int)
    shifted = np.asarray(apply_op("TranslateX", img, 5)).astype(int)
    np.testing.assert_array_equal(shifted[:, :-5], a[:, 5:])  # content moves left by 5 pixels
    assert (shifted[:, -5:] == 128).all()  # LAVIS's grey fill
    down = np.asarray(apply_op("TranslateY", img, -3)).astype(int)
    np.testing.assert_array_equal(down[3:], a[:-3])
    assert apply_op("Identity", img, None) is img
    np.testing.assert_array_equal(np.asarray(apply_op("Brightness", img, 1.0)), a)  # M = 5 is a no-op factor
    dark = np.asarray(apply_op("Brightness", img, 0.5)).astype(int)
    assert abs(dark.mean() - a.mean() / 2) < 1.5
    flat = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    flat.putpixel((0, 0), (100, 100, 100))
    stretched = np.asarray(apply_op("AutoContrast", flat, None))
    assert stretched.min() == 0 and stretched.max() == 255
    rotated = np.asarray(apply_op("Rotate", Image.fromarray(np.full((20, 20, 3), 255, np.uint8)), 30))
    assert (rotated[0, 0] == 128).all() and (rotated[10, 10] == 255).all()  # corners filled, centre kept
    sheared = np.asarray(apply_op("ShearX", img, 0.2)).astype(int)
    np.testing.assert_array_equal(sheared[0], a[0])  # the top row is the shear's fixed line (OpenCV's origin)
    assert not np.array_equal(sheared[-1], a[-1])


def test_crop_box_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, w, h = resized_crop_box(120, 80, rng)
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 80
        assert 0.5 * 9600 * 0.97 <= w * h <= 9600 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_views_are_seeded_and_independent_per_backbone():
    img = picture(64, 48)
    view = TrainView(32, 5, lambda im: np.asarray(im))
    a = view(img, view_rng(0, 3, 1, "blip"))
    assert a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, view(img, view_rng(0, 3, 1, "blip")))  # same seed, same view
    others = [view(img, view_rng(*key)) for key in ((0, 3, 1, "clip"), (0, 3, 2, "blip"), (1, 3, 1, "blip"))]
    assert all(not np.array_equal(a, o) for o in others)  # other backbone, view or seed: another crop


def test_backbone_train_transforms_are_the_reference_recipes():
    from extract.backbones import create

    blip, clip = create("blip-tiny"), create("clip-tiny")
    tb, tc = blip.train_transform(), clip.train_transform()
    assert tb.augment.magnitude == 5 and tc.augment.magnitude == 7
    assert tb.size == blip.image_size and tc.size == clip.image_size
    img = picture(80, 60)
    x = tb(img, view_rng(0, 0, 1, "blip-tiny"))
    y = tc(img, view_rng(0, 0, 1, "clip-tiny"))
    assert tuple(x.shape) == (3, blip.image_size, blip.image_size)
    assert tuple(y.shape) == (3, clip.image_size, clip.image_size)
