"""Stage one: extraction with the tiny backbones into HDF5 shards."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from data.store import FeatureStore, read_shard_attrs
from pipeline import cli

ROOT = Path(__file__).resolve().parents[1]


def extract(data_root, cache, *args, expect=0):
    """`pipeline extract` of the toy dataset's test split (unless args name a split)."""
    split = () if "--split" in args else ("--split", "test")
    result = CliRunner().invoke(cli, ["extract", "--dataset", "toy", "--data-root", str(data_root),
                                      "--cache", str(cache), "--workers", "0", *split, *map(str, args)])
    assert result.exit_code == expect, result.output
    return result


def load(cache, backbone, split="test"):
    store = FeatureStore.at(cache, "toy", split, backbone)
    return store.load("images"), store.load("texts")


@pytest.mark.parametrize("backbone", ["blip-tiny", "clip-tiny"])
def test_extract_writes_the_shard_schema(tiny_data, tmp_path, backbone):
    extract(tiny_data, tmp_path / "c", "--backbone", backbone, "--split", "test", "--shard-size", 5)
    store = FeatureStore.at(tmp_path / "c", "toy", "test", backbone)
    names = sorted(p.name for p in store.root.glob("*.h5"))
    n_caps = len(store.load("texts", tokens=False))
    assert names == ["images-00000.h5", "images-00001.h5"] + [f"texts-{k:05d}.h5" for k in range(-(-n_caps // 5))]
    with h5py.File(store.root / "images-00000.h5") as f:
        assert f["ids"].dtype == np.int64 and f["embeds"].dtype == np.float32 and f["tokens"].dtype == np.float16
        assert f["offsets"].dtype == np.int64 and f["norms"].dtype == np.float32
        assert f.attrs["backbone"] == backbone and f.attrs["complete"] and f.attrs["precision"] == "fp32"
        assert "torch" in f.attrs and "preprocessing" in f.attrs
    images, texts = load(tmp_path / "c", backbone)
    assert images.ids.tolist() == list(range(8))
    np.testing.assert_allclose(np.linalg.norm(images.embeds, axis=1), 1, atol=1e-5)
    assert (images.norms > 0).all()
    per_image = np.diff(images.offsets)
    assert len(set(per_image)) == 1 and images.offsets[-1] == len(images.tokens)
    expected_rows = 17 if backbone == "blip-tiny" else 1  # CLS + 4x4 patches; CLIP: its global node only
    assert per_image[0] == expected_rows
    lengths = np.diff(texts.offsets)
    assert len(texts) == n_caps and (lengths >= 1).all()
    if backbone == "blip-tiny":
        assert len(set(lengths)) > 1  # padding stripped per caption
    else:  # CLIP's global node is its raw projection
        np.testing.assert_allclose(texts.tokens[:, :].astype(np.float32), texts.raw_embeds, rtol=2e-2, atol=2e-3)


def test_blip_embeddings_match_the_models_own_itc_score(tiny_data, tmp_path):
    from data.datasets import load_split, resolve
    from extract.backbones import create
    from extract.reader import load_rgb

    extract(tiny_data, tmp_path / "c", "--backbone", "blip-tiny", "--split", "test")
    images, texts = load(tmp_path / "c", "blip-tiny")
    b = create("blip-tiny")
    index = load_split(resolve("toy", tiny_data), "test")
    px = torch.stack([b.eval_transform()(load_rgb(tiny_data / "toy" / "images" / p)) for p in index.images[:2]])
    tok = b.tokenize(list(index.captions[:3]))
    with torch.inference_mode():
        itc = b.module(input_ids=tok.inputs["input_ids"][:1], attention_mask=tok.inputs["attention_mask"][:1],
                       pixel_values=px, use_itm_head=False).itm_score
    np.testing.assert_allclose(itc[:, 0].numpy(), images.embeds[:2] @ texts.embeds[0], atol=1e-4)


def test_tiny_blip_tokenizer_knows_the_words():
    from extract.backbones import create

    b = create("blip-tiny")
    ids = b.tokenize(["A red circle on the left of a blue square."]).inputs["input_ids"][0].tolist()
    assert b.tokenizer.unk_token_id not in ids


def test_rerun_is_deterministic_and_resumes_after_a_crash(tiny_data, tmp_path):
    args = ("--backbone", "blip-tiny", "--split", "train", "--shard-size", 4, "--views", 1)
    extract(tiny_data, tmp_path / "a", *args)
    extract(tiny_data, tmp_path / "b", *args)
    ref_img, ref_txt = load(tmp_path / "a", "blip-tiny", "train")
    img, _ = load(tmp_path / "b", "blip-tiny", "train")
    np.testing.assert_array_equal(ref_img.tokens, img.tokens)
    np.testing.assert_array_equal(ref_img.view, img.view)
    assert set(ref_img.view) == {0, 1}
    clean, aug = ref_img.embeds[ref_img.view == 0], ref_img.embeds[ref_img.view == 1]
    assert not np.allclose(clean, aug)  # views really are augmented

    # Simulate a run killed mid-way: one shard cut off (no `complete`), a temporary file left behind.
    root = FeatureStore.at(tmp_path / "b", "toy", "train", "blip-tiny").root
    with h5py.File(root / "images-00001.h5", "r+") as f:
        del f.attrs["complete"]
        f["tokens"][0] = 0
    (root / ".images-00002.h5.999.tmp").write_bytes(b"partial")
    (root / "texts-00000.h5").unlink()
    before = (root / "images-00000.h5").stat().st_mtime_ns
    out = extract(tiny_data, tmp_path / "b", *args).output
    assert "2 written now" in out
    assert not list(root.glob(".*.tmp"))  # leftovers of the killed run are cleared
    assert (root / "images-00000.h5").stat().st_mtime_ns == before  # complete shards untouched
    img, txt = load(tmp_path / "b", "blip-tiny", "train")
    np.testing.assert_array_equal(ref_img.tokens, img.tokens)
    np.testing.assert_array_equal(ref_txt.embeds, txt.embeds)


def test_token_pool_and_dry_run_estimate(tiny_data, tmp_path):
    out = extract(tiny_data, tmp_path / "c", "--backbone", "blip-tiny", "--dry-run").output
    assert "would write" in out and not (tmp_path / "c").exists()
    extract(tiny_data, tmp_path / "c", "--backbone", "blip-tiny", "--token-pool", 2)
    images, _ = load(tmp_path / "c", "blip-tiny")
    assert set(np.diff(images.offsets)) == {1 + 2 * 2}  # CLS + 4x4 grid pooled to 2x2
    root = FeatureStore.at(tmp_path / "c", "toy", "test", "blip-tiny").root
    assert read_shard_attrs(root / "images-00000.h5")["token_pool"] == 2


def test_another_configuration_is_refused(tiny_data, tmp_path):
    extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny")
    out = extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--clip-tokens", expect=2).output
    assert "another configuration" in out and "clip_tokens" in out


def shard_files(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(root.glob("*.h5"))}


def test_a_store_keeps_its_shard_size(tiny_data, tmp_path, caplog):
    extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--shard-size", 3)
    store = FeatureStore.at(tmp_path / "c", "toy", "test", "clip-tiny")
    before = shard_files(store.root)
    assert store.manifest()["shard_size"] == 3 and len([n for n in before if n.startswith("images")]) == 3
    out = extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny").output  # the default, not given: adopted
    assert "made with --shard-size 3: continuing with it" in caplog.text and "(0 written now)" in out
    out = extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--shard-size", 5, expect=2).output
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: --shard-size 5: the store at {store.root} was made with --shard-size 3; leave "
                      f"--shard-size out to continue it, or use another --cache"], out
    assert shard_files(store.root) == before  # nothing rewritten, nothing left beside the store's shards
    (store.root / "images-00042.h5").write_bytes((store.root / "images-00000.h5").read_bytes())
    on_disk = [extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny").output.split("on disk")[0][-12:]]
    (store.root / "images-00042.h5").unlink()
    on_disk.append(extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny").output.split("on disk")[0][-12:])
    assert on_disk[0] == on_disk[1]  # a stray file is not counted as the store's


def test_a_store_begun_before_shard_sizes_were_recorded(tiny_data, tmp_path):
    extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--shard-size", 3)
    store = FeatureStore.at(tmp_path / "c", "toy", "test", "clip-tiny")
    manifest = store.manifest()
    legacy = {k: v for k, v in manifest.items() if k in ("schema", "fingerprint")}  # claimed, never finished
    store.manifest_path.write_text(json.dumps({**legacy, "complete": False}))
    before = shard_files(store.root)
    out = extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--shard-size", 4, expect=2).output
    assert "--shard-size 4: the store at" in out and "made with --shard-size 3" in out
    assert shard_files(store.root) == before
    out = extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny").output  # read off its shards
    assert "(0 written now)" in out and store.manifest()["shard_size"] == 3


def test_a_killed_legacy_store_with_its_first_shards_only(tiny_data, tmp_path):
    """The images fit one shard (any size at least 8 cuts them so): the size is read off the captions' shard."""
    extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--shard-size", 10)
    store = FeatureStore.at(tmp_path / "c", "toy", "test", "clip-tiny")
    n_texts = len(store.load("texts", tokens=False))
    legacy = {k: v for k, v in store.manifest().items() if k in ("schema", "fingerprint")}
    store.manifest_path.write_text(json.dumps({**legacy, "complete": False}))
    for path in store.root.glob("*.h5"):
        if not path.stem.endswith("-00000"):
            path.unlink()
    out = extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny").output
    assert f"in {1 + -(-n_texts // 10)} shards ({-(-n_texts // 10) - 1} written now)" in out, out
    assert store.manifest()["shard_size"] == 10


def test_a_store_without_shards_takes_a_new_size_and_configuration_is_said_first(tiny_data, tmp_path):
    extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--shard-size", 3)
    store = FeatureStore.at(tmp_path / "c", "toy", "test", "clip-tiny")
    out = extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--shard-size", 5, "--precision", "bf16",
                  expect=2).output
    assert "another configuration" in out and "--shard-size" not in out.split("Error:")[1]
    store.manifest_path.write_text(json.dumps({**store.manifest(), "complete": False}))
    for path in store.root.glob("*.h5"):  # killed before its first shard was written
        path.unlink()
    extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--shard-size", 5)
    assert store.manifest()["shard_size"] == 5 and (store.root / "images-00001.h5").is_file()


def test_a_folder_of_no_readable_image_is_refused_and_leaves_no_empty_store(tiny_data, tmp_path):
    (tmp_path / "empty").mkdir()
    ann = tiny_data / "toy" / "dataset_toy.json"
    args = ("--backbone", "clip-tiny", "--annotations", ann, "--dataset", "d")
    out = extract(tiny_data, tmp_path / "c", *args, "--images", tmp_path / "empty", "--skip-bad", expect=2).output
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "all 8 images of d/test are unreadable" in errors[0], out
    assert f"{tmp_path / 'empty'}/img_0016.jpg" in errors[0] and f"is {tmp_path / 'empty'} their folder" in errors[0]
    store = FeatureStore.at(tmp_path / "c", "d", "test", "clip-tiny")
    assert not store.manifest()["complete"] and not list(store.root.glob("images-*.h5"))
    out = extract(tiny_data, tmp_path / "c", *args, "--images", tiny_data / "toy" / "images", "--skip-bad").output
    assert "8 image rows" in out and "0 bad images" in out


def test_bad_images_are_named_and_skipped_consistently(tiny_data, tmp_path):
    images = tiny_data / "toy" / "images"
    (images / "img_0017.jpg").write_bytes((images / "img_0017.jpg").read_bytes()[:200])  # truncated
    (images / "img_0019.jpg").unlink()  # missing
    out = extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", expect=2).output
    assert "img_0017.jpg" in out and "img_0019.jpg" in out and "--skip-bad" in out
    assert "Traceback" not in out
    extract(tiny_data, tmp_path / "c", "--backbone", "clip-tiny", "--skip-bad")
    store = FeatureStore.at(tmp_path / "c", "toy", "test", "clip-tiny")
    bad = store.bad_images()
    assert sorted(bad) == [1, 3]  # test images are rows 16.. of the file: 17 -> 1, 19 -> 3
    assert sorted(set(range(8)) - set(store.load("images").ids)) == [1, 3]
    assert len(store.load("texts")) == len(store.load("texts", tokens=False))


def test_grayscale_cmyk_and_alpha_images_are_converted(tmp_path):
    from PIL import Image

    from extract.reader import load_rgb

    for mode in ("L", "CMYK", "RGBA", "LA", "P"):
        path = tmp_path / f"x_{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
        Image.new(mode, (8, 8)).save(path)
        assert load_rgb(path).mode == "RGB"


def test_local_blip_checkpoint_folder_loads_like_the_tiny_preset(tiny_data, tmp_path):
    """The tiny preset's weights from a folder: `blip` computes the vision norms at BLIP's eps 1e-6 (the preset keeps
    its config's 1e-5), so it equals the preset at 1e-6 and differs from the preset as it is."""
    from data.datasets import load_split, resolve
    from extract.backbones.blip import tiny_blip
    from extract.backbones.lavis_vit import set_layer_norm_eps
    from extract.reader import load_rgb

    model, tokenizer, processor = tiny_blip()
    folder = tmp_path / "blip-local"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    extract(tiny_data, tmp_path / "c", "--backbone", "blip", "--checkpoint", folder)
    extract(tiny_data, tmp_path / "c", "--backbone", "blip-tiny")
    a, _ = load(tmp_path / "c", "blip")
    b, _ = load(tmp_path / "c", "blip-tiny")
    assert np.abs(a.embeds - b.embeds).max() > 1e-4
    set_layer_norm_eps(model.vision_model, 1e-6)
    index = load_split(resolve("toy", tiny_data), "test")
    px = torch.stack([processor(images=load_rgb(tiny_data / "toy" / "images" / p), return_tensors="pt")
                      ["pixel_values"][0] for p in index.images])
    with torch.inference_mode():
        want = torch.nn.functional.normalize(model.vision_proj(model.vision_model(pixel_values=px)
                                                               .last_hidden_state[:, 0]), dim=-1)
    np.testing.assert_allclose(a.embeds, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("backbone,names", [
    ("blip", "Salesforce/blip-itm-base-coco"), ("clip", "ViT-L-14-336-quickgelu"),
    ("blip2", "Salesforce/blip2-itm-vit-g-coco"),
    ("open_clip:ViT-SO400M-14-SigLIP2-378@webli", "ViT-SO400M-14-SigLIP2-378 / webli"),
    ("open_clip:EVA02-L-14", "EVA02-L-14 / merged2b_s4b_b131k")])
def test_real_preset_fails_fast_offline(tiny_data, tmp_path, backbone, names):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "extract", "--backbone", backbone,
                           "--dataset", "toy", "--data-root", str(tiny_data), "--cache", str(tmp_path / "c")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert names in proc.stderr and "--checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert time.perf_counter() - t0 < 60  # seconds of imports, no network retries
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("backbone,limit", [("blip-tiny", 40), ("clip-tiny", 24)])
def test_long_captions_are_truncated_and_counted(tiny_data, tmp_path, backbone, limit):
    import json

    long = " ".join(["red circle"] * limit)  # 2 * limit words: past either encoder's limit
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "img_0000.jpg", "caption": ["a red circle", long]},
                               {"image": "img_0001.jpg", "caption": [long, "blue"]}]))
    out = extract(tiny_data, tmp_path / "c", "--backbone", backbone, "--annotations", ann,
                  "--images", tiny_data / "toy" / "images").output
    assert "2 captions truncated" in out
    _, texts = load(tmp_path / "c", backbone)
    assert np.diff(texts.offsets).max() <= limit


def test_one_call_extracts_every_backbone_and_split_of_the_only_dataset(tiny_data, monkeypatch):
    monkeypatch.chdir(tiny_data.parent)  # holds datasets/toy only: no --dataset, --data-root or --split needed
    out = CliRunner().invoke(cli, ["extract", "--backbone", "clip-tiny,blip-tiny", "--views", "1", "--workers", "0"])
    assert out.exit_code == 0, out.output
    stores = [line.split(":")[0] for line in out.output.splitlines() if line.startswith("cache/")]
    splits = ("train", "val", "test")
    assert stores == [f"cache/toy/{split}/{b}" for b in ("clip-tiny", "blip-tiny") for split in splits]
    for backbone in ("clip-tiny", "blip-tiny"):
        for split, n in (("train", 10), ("val", 6), ("test", 8)):
            images = FeatureStore.at("cache", "toy", split, backbone).load("images", tokens=False)
            assert sorted(set(images.ids)) == list(range(n))
            assert len(images) == n * (2 if split == "train" else 1)  # --views applies to train only
    rerun = CliRunner().invoke(cli, ["extract", "--backbone", "clip-tiny", "--workers", "0"])
    assert rerun.exit_code == 2 and "another configuration" in rerun.output  # train was made with --views 1
    rerun = CliRunner().invoke(cli, ["extract", "--backbone", "clip-tiny", "--views", "1", "--workers", "0"])
    assert rerun.exit_code == 0 and rerun.output.count("(0 written now)") == 3  # complete stores: nothing redone
