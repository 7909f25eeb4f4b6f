"""`pipeline import-hada` checks that the cached features are the ones the reference was trained on (read from the
stores' fingerprints): node layouts it never produced are refused by flag; other weights, precision or captions are
warnings, carried into every score table of the run ("features differ from the reference's: ..."), or refusals
with --strict."""
import json

import hada_reference as ref
import numpy as np
import pytest
import torch

from conftest import run_cli
from data.index import SplitIndex, store_index
from data.store import FeatureStore, ShardData, write_shard

pytestmark = pytest.mark.usefixtures("one_thread")
D, E1, E2 = 12, 6, 9  # node width of both, BLIP's and CLIP's embedding widths (the checkpoint's, in miniature)

BLIP = {"backbone": "blip", "model": "BlipForImageTextRetrieval", "checkpoint": "/w/blip_flickr_retrieval.pth",
        "image_size": 384, "embed_dim": E1, "precision": "fp32", "token_pool": 1, "views": 0,
        "vision_layer_norm_eps": 1e-6}
CLIP = {"backbone": "clip", "model": "ViT-L-14-336-quickgelu", "checkpoint": "openai", "image_size": 336,
        "embed_dim": E2, "clip_tokens": False, "precision": "fp32", "token_pool": 1, "views": 0}


def cache_with(root, blip=None, clip=None, blip_rows=5, clip_rows=1, captions=5, dataset="flickr30k"):
    """val and test stores of two backbones with these fingerprint changes and node rows per image."""
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        index = SplitIndex.from_samples(dataset, split, [(f"{split}{i}.jpg", [f"c {i} {k}" for k in range(captions)])
                                                         for i in range(6)])
        store_index(index, root)
        for name, fp, embed, rows in (("blip", {**BLIP, **(blip or {})}, E1, blip_rows),
                                      ("clip", {**CLIP, **(clip or {})}, E2, clip_rows)):
            store = FeatureStore.at(root, dataset, split, name)
            manifest = store.claim({**fp, "index_version": index.version})
            for kind, n, r in (("images", 6, rows), ("texts", 6 * captions, 3 if name == "blip" else 1)):
                raw = rng.normal(size=(n, embed)).astype(np.float32)
                norms = np.linalg.norm(raw, axis=1)
                write_shard(store.root / f"{kind}-00000.h5",
                            ShardData(ids=np.arange(n), embeds=raw / norms[:, None], norms=norms,
                                      offsets=np.arange(n + 1) * r,
                                      tokens=rng.normal(size=(n * r, D)).astype(np.float16)), {"kind": kind})
            manifest.update(shards={"images": ["images-00000.h5"], "texts": ["texts-00000.h5"]}, bad_images=[])
            store.finish(manifest)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    img, cap = ref.MH(D, D, E1, E2, 8, 2, 10), ref.MH(D, D, E1, E2, 8, 2, 10)
    path = tmp_path_factory.mktemp("ckpt") / "best.pth.tar"
    torch.save(ref.reference_checkpoint(img, cap, ref.Discriminator(10), 0.05, 0), path)
    return path


def import_run(checkpoint, cache, runs, *extra, expect=0, dataset="flickr30k"):
    return run_cli("import-hada", checkpoint, "--dataset", dataset, "--backbones", "blip,clip", "--run", "r",
                   "--cache", cache, "--runs", runs, *extra, expect=expect).output


def test_the_reference_layout_imports_without_caveats(tmp_path, checkpoint):
    cache, runs = cache_with(tmp_path / "c"), tmp_path / "runs"
    import_run(checkpoint, cache, runs)
    assert json.loads((runs / "r" / "config.json").read_text())["provenance"] == []
    out = run_cli("score", "--dataset", "flickr30k", "--run", "r", "--cache", cache, "--runs", runs).output
    assert "features differ" not in out


@pytest.mark.parametrize("change,message", [
    (dict(blip={"token_pool": 2}, blip_rows=3), "--token-pool 2 (blip: 3 nodes per image; the reference takes every "
                                                "patch token)"),
    (dict(clip={"clip_tokens": True}, clip_rows=4), "--clip-tokens (clip: 4 nodes per image; the reference's CLIP is "
                                                    "one global node)"),
    (dict(clip={"image_size": 224, "model": "ViT-L-14-quickgelu"}), "--model ViT-L-14-quickgelu (224 px; the "
                                                                    "reference's CLIP is ViT-L-14-336 at 336 px)"),
    (dict(blip_rows=1), "--backbones blip,...: the first backbone has no patch tokens (1 image nodes)"),
    (dict(blip={"query_tokens": 32}), "--backbones blip,...: the first backbone has no patch tokens"),
])
def test_node_layouts_the_reference_never_produced_are_refused_by_flag(tmp_path, checkpoint, change, message):
    cache, runs = cache_with(tmp_path / "c", **change), tmp_path / "runs"
    out = import_run(checkpoint, cache, runs, expect=2)
    assert out.startswith("Error: the cached features have a node layout the reference never produced: ")
    assert message in out and out.count("\n") == 1 and not (runs / "r").exists()


def test_other_weights_precision_and_captions_are_labelled_in_every_score(tmp_path, checkpoint):
    cache = cache_with(tmp_path / "c", blip={"checkpoint": "Salesforce/blip-itm-base-coco",
                                             "vision_layer_norm_eps": None},
                       clip={"precision": "bf16", "checkpoint": "/w/other.safetensors"}, captions=6)
    runs = tmp_path / "runs"
    out = import_run(checkpoint, cache, runs, "--strict", expect=2)
    assert out.startswith("Error: --strict: features differ from the reference's: ") and not (runs / "r").exists()
    import_run(checkpoint, cache, runs)
    caveats = json.loads((runs / "r" / "config.json").read_text())["provenance"]
    assert caveats == [
        "blip weights Salesforce/blip-itm-base-coco, not LAVIS's blip_flickr_retrieval.pth (transformers' conversion "
        "of the BLIP repository's checkpoint: not confirmed to be the same weights) (fine-tuned on coco?)",
        "blip vision LayerNorm eps from the weights' config, not BLIP's 1e-06 (extracted before it was set: "
        "re-extract)",
        "clip (ViT-L-14-336-quickgelu @ /w/other.safetensors) is not the reference's CLIP "
        "(ViT-L-14-336-quickgelu @ openai)",
        "--precision bf16 (clip; the reference computes in fp32)",
        "up to 6 captions per image; the reference scores the first 5 (--captions-per-image 5)"]
    out = run_cli("score", "--dataset", "flickr30k", "--run", "r", "--cache", cache, "--runs", runs, "--json",
                  tmp_path / "s.json").output
    label = "hada: features differ from the reference's: " + "; ".join(caveats)
    assert label in out.splitlines()
    assert json.loads((tmp_path / "s.json").read_text())["notes"]["hada"] == label[len("hada: "):]
    assert label in (tmp_path / "s.md").read_text()


def test_a_dataset_of_neither_family_and_other_backbones_are_warned(tmp_path, checkpoint):
    from fuse.provenance import StoreFacts, warnings

    cache = cache_with(tmp_path / "c", dataset="mine")
    import_run(checkpoint, cache, tmp_path / "runs", dataset="mine")
    caveats = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())["provenance"]
    assert caveats[0] == "--dataset mine: the reference has checkpoints for Flickr30k and COCO only"
    albef = StoreFacts("albef@flickr30k", {"model": "AlbefRetrieval", "checkpoint": "f.pth"}, 577)
    siglip = StoreFacts("open_clip.ViT-SO400M", {"model": "ViT-SO400M-14-SigLIP2-378", "checkpoint": "webli",
                                                 "clip_tokens": False, "image_size": 378}, 1)
    assert warnings([albef, siglip], "coco", 5) == [
        "albef@flickr30k is not the reference's BLIP (blip_coco_retrieval.pth)",
        "open_clip.ViT-SO400M (ViT-SO400M-14-SigLIP2-378 @ webli) is not the reference's CLIP "
        "(ViT-L-14-336-quickgelu @ openai)"]
