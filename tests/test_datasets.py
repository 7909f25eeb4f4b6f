"""Dataset readers and the split index."""
import json

import numpy as np
import pytest

from data.datasets import load_split, resolve
from data.errors import PipelineError
from data.index import SplitIndex, store_index


def test_karpathy_reader_keeps_every_caption_in_order(tiny_data):
    toy = tiny_data / "toy"
    spec = resolve("toy", tiny_data, annotations=toy / "dataset_toy.json", images=toy / "images")
    obj = json.loads(spec.annotations.read_text())
    test = [e for e in obj["images"] if e["split"] == "test"]
    index = load_split(spec, "test")
    assert index.images == tuple(e["filename"] for e in test)
    assert index.captions == tuple(s["raw"] for e in test for s in e["sentences"])
    counts = np.bincount(index.text_to_image)
    assert counts.tolist() == [len(e["sentences"]) for e in test]
    assert set(counts) <= {5, 6, 7} and len(set(counts)) > 1
    assert index.image_to_texts[1] == list(range(counts[0], counts[0] + counts[1]))
    assert len(load_split(spec, "all").images) == 24


def test_coco_restval_counts_as_train_and_filepath_joins(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    entries = [{"filepath": "val2014", "filename": f"x{i}.jpg", "split": s, "sentences": [{"raw": "a dog"}]}
               for i, s in enumerate(["train", "restval", "test"])]
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    index = load_split(resolve("coco", tmp_path), "train")
    assert index.images == ("val2014/x0.jpg", "val2014/x1.jpg")


def test_lavis_eval_and_train_formats(tmp_path):
    ev = tmp_path / "flickr30k_test.json"
    ev.write_text(json.dumps([{"image": "a/1.jpg", "caption": ["one", "two"]},
                              {"image": "a/2.jpg", "caption": ["three"]}]))
    index = load_split(resolve("flickr30k", annotations=ev, images=tmp_path), "test")
    assert index.images == ("a/1.jpg", "a/2.jpg") and index.text_to_image.tolist() == [0, 0, 1]
    tr = tmp_path / "flickr30k_train.json"
    tr.write_text(json.dumps([{"image": "b.jpg", "caption": "x y", "image_id": "b"},
                              {"image": "c.jpg", "caption": "z", "image_id": "c"},
                              {"image": "b.jpg", "caption": "w", "image_id": "b"}]))
    index = load_split(resolve("flickr30k", annotations=tr, images=tmp_path), "train")
    assert index.images == ("b.jpg", "c.jpg") and index.captions == ("x y", "w", "z")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.jpg", "a/../../b.jpg"])
def test_path_escape_is_refused(tmp_path, bad):
    ev = tmp_path / "ann.json"
    ev.write_text(json.dumps([{"image": bad, "caption": ["x"]}]))
    with pytest.raises(PipelineError, match="leaves the image folder"):
        load_split(resolve("x", annotations=ev, images=tmp_path), "test")


def test_empty_caption_is_refused_by_name(tmp_path):
    ev = tmp_path / "ann.json"
    ev.write_text(json.dumps([{"image": "ok.jpg", "caption": ["fine", "  "]}]))
    with pytest.raises(PipelineError, match=r"caption 1 of image 'ok.jpg' is empty"):
        load_split(resolve("x", annotations=ev, images=tmp_path), "test")


@pytest.mark.parametrize("images,message", [
    ({"x": 1}, "'images' is not a list"),
    ([{"split": "test", "sentences": [{"raw": "a"}]}], r"images\[0\] is not an entry with a 'filename'"),
    (["x.jpg"], r"images\[0\] is not an entry"),
    ([{"filename": "x.jpg", "split": "test", "sentences": [{"tokens": ["a"]}]}], "'x.jpg' has sentences without"),
    ([{"filename": "x.jpg", "split": "test", "sentences": "a dog"}], "'x.jpg' has sentences without"),
])
def test_malformed_karpathy_entries_are_refused_by_name(tmp_path, images, message):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"images": images}))
    with pytest.raises(PipelineError, match=message):
        load_split(resolve("coco", tmp_path), "test")


@pytest.mark.parametrize("entries", [["a.jpg"], [{"image": 3, "caption": "x"}], [{"image": "a.jpg"}]])
def test_malformed_lavis_entries_are_refused_by_name(tmp_path, entries):
    ev = tmp_path / "ann.json"
    ev.write_text(json.dumps([{"image": "ok.jpg", "caption": "fine"}, *entries]))
    with pytest.raises(PipelineError, match="entry 1 is not an object with an 'image' path and a 'caption'"):
        load_split(resolve("x", annotations=ev, images=tmp_path), "test")


def test_index_roundtrip_and_version_mismatch(tmp_path):
    a = SplitIndex.from_samples("d", "test", [("1.jpg", ["x", "y"]), ("2.jpg", ["z"])])
    b = SplitIndex.from_samples("d", "test", [("1.jpg", ["x", "y"]), ("2.jpg", ["z", "w"])])
    path = store_index(a, tmp_path)
    loaded = SplitIndex.load(path)
    assert loaded.version == a.version and loaded.captions == a.captions
    assert store_index(a, tmp_path) == path
    with pytest.raises(PipelineError, match="differs from the annotations"):
        store_index(b, tmp_path)


def test_captions_per_image_keeps_the_first_k_of_val_and_test_images(tiny_data, tmp_path):
    """5 to 7 captions per image: --captions-per-image 5 keeps each val/test image's first 5, in order, as the
    reference evaluates; train keeps every caption, as the reference trains; the stores and index follow."""
    from conftest import run_cli
    from data.datasets import load_splits
    from data.index import index_path
    from data.store import FeatureStore

    spec = resolve("toy", tiny_data)
    full, kept = load_splits(spec), load_splits(spec, captions_per_image=5)
    assert kept["train"].captions == full["train"].captions and max(np.bincount(full["train"].text_to_image)) > 5
    for split in ("val", "test"):
        want = tuple(c for caps in full[split].image_to_texts for c in [full[split].captions[j] for j in caps][:5])
        assert kept[split].captions == want and set(np.bincount(kept[split].text_to_image)) == {5}
        assert len(want) < len(full[split].captions) and kept[split].version != full[split].version
    cache = tmp_path / "cache"
    run_cli("extract", "--backbone", "blip-tiny", "--dataset", "toy", "--captions-per-image", 5, "--data-root",
            tiny_data, "--cache", cache, "--workers", 0)
    for split in ("train", "val", "test"):
        assert SplitIndex.load(index_path(cache, "toy", split)).captions == kept[split].captions
        assert len(FeatureStore.at(cache, "toy", split, "blip-tiny").load("texts", tokens=False)) == \
            len(kept[split].captions)
    # Another caption set is another index: a backbone extracted without the option is refused, not mixed in.
    out = run_cli("extract", "--backbone", "clip-tiny", "--dataset", "toy", "--split", "test", "--data-root",
                  tiny_data, "--cache", cache, "--workers", 0, expect=2).output
    assert "differs from the annotations read now" in out
