"""What the commands find on disk when --dataset or --backbones is left out."""
import json

import pytest

from data.discover import (
    cached_backbones,
    cached_datasets,
    dataset_in_cache,
    dataset_in_data_root,
    datasets_under,
    fuse_backbones,
)
from data.errors import PipelineError


def store(cache, dataset, split, backbone, complete=True, spec=None):
    root = cache / dataset / split
    (root / backbone).mkdir(parents=True, exist_ok=True)
    (root / "index.json").write_text("{}")
    manifest = {"complete": complete, **({"spec": spec} if spec else {})}
    (root / backbone / "manifest.json").write_text(json.dumps(manifest))


def test_datasets_under_a_data_root(tmp_path):
    for name in ("coco", "flickr30k"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"dataset_{name}.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "dataset_other.json").write_text("{}")  # not named after its folder
    assert datasets_under(tmp_path) == ["coco", "flickr30k"]
    assert datasets_under(tmp_path / "nowhere") == []
    with pytest.raises(PipelineError, match=r"2 datasets under .* \(coco, flickr30k\): pick one with --dataset"):
        dataset_in_data_root(tmp_path, None)
    assert dataset_in_data_root(tmp_path, "flickr30k") == "flickr30k"
    (tmp_path / "coco" / "dataset_coco.json").unlink()
    assert dataset_in_data_root(tmp_path, None) == "flickr30k"


def test_backbones_cached_for_train_and_val_in_name_order(tmp_path):
    for b in ("zeta", "alpha", "mid"):
        store(tmp_path, "coco", "train", b)
    store(tmp_path, "coco", "val", "zeta")
    store(tmp_path, "coco", "val", "alpha")
    store(tmp_path, "coco", "val", "mid", complete=False)  # an extraction cut off: not ready
    store(tmp_path, "coco", "test", "other")
    assert cached_datasets(tmp_path) == ["coco"]
    assert cached_backbones(tmp_path, "coco", ("train", "val")) == {"alpha": "alpha", "zeta": "zeta"}
    assert fuse_backbones(tmp_path, "coco", None) == ["alpha", "zeta"]  # the weighted stage's is "alpha"
    assert fuse_backbones(tmp_path, "coco", "zeta, alpha") == ["zeta", "alpha"]  # named: that order
    with pytest.raises(PipelineError, match="mid not cached for both train and val.*alpha, zeta"):
        fuse_backbones(tmp_path, "coco", "alpha,mid")
    assert dataset_in_cache(tmp_path, None) == "coco"
    store(tmp_path, "f30k", "test", "alpha")
    with pytest.raises(PipelineError, match=r"\(coco, f30k\): pick one with --dataset"):
        dataset_in_cache(tmp_path, None)
    with pytest.raises(PipelineError, match="no dataset 'nosuch'.*found: coco, f30k"):
        dataset_in_cache(tmp_path, "nosuch")


def test_stores_named_otherwise_than_their_spec_are_fused_by_their_spec(tmp_path):
    """The store name is derived from the spec and cannot be parsed back; discovery returns the recorded spec."""
    specs = {"open_clip.ViT-L-16-SigLIP2-384@webli": "open_clip:ViT-L-16-SigLIP2-384@webli",
             "blip2@Salesforce.blip2-itm-vit-g-coco": "blip2@Salesforce/blip2-itm-vit-g-coco"}
    for split in ("train", "val"):
        for name, spec in specs.items():
            store(tmp_path, "coco", split, name, spec=spec)
    found = fuse_backbones(tmp_path, "coco", None)
    assert found == ["blip2@Salesforce/blip2-itm-vit-g-coco", "open_clip:ViT-L-16-SigLIP2-384@webli"]
    # what `pipeline fuse` does with them: parse as specs, back to the store names
    assert fuse_backbones(tmp_path, "coco", ",".join(found)) == found
