"""Any open_clip model by name (open_clip:<model>[@weights]): local weights, HF tokenizers, patch tokens, refusals.

Fast tests register tiny configs of the real tower classes (a timm ViT with SigLIP's attention pooling, one with
EVA's class-token pooling); slow ones load full-size architectures (SigLIP 2 ViT-B/16, CLIP ViT-B/32) with
random weights saved the way downloaded ones are.
"""
import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_FUSE, WORDS, run_cli
from data.backbone_spec import store_name
from data.errors import PipelineError
from data.store import FeatureStore, read_shard_attrs


def tiny_tower_config(pool: str, proj: str, embed_dim: int = 64) -> dict:
    """A SigLIP-style model (timm tower, HF tokenizer, no causal mask, last-token pooling) at toy size."""
    return {"embed_dim": embed_dim, "init_logit_bias": -10, "custom_text": True,
            "vision_cfg": {"image_size": 64, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                           "timm_pool": pool, "timm_proj": proj},
            "text_cfg": {"context_length": 16, "vocab_size": 64, "hf_tokenizer_name": "timm/not-cached-here",
                         "tokenizer_kwargs": {"clean": "canonicalize"}, "width": embed_dim, "heads": 2, "layers": 2,
                         "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}}


TINY = {"tiny-siglip-test": tiny_tower_config("map", "none"), "tiny-eva-test": tiny_tower_config("token", "linear", 32)}
SIGLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                     "resize_mode": "squash"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Register the tiny configs with open_clip (by name, as built-in ones are)."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in TINY.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    return list(TINY)


def save_tokenizer(folder) -> None:
    """A word-level Hugging Face tokenizer of the test vocabulary (SigLIP's would come from the Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>") \
        .save_pretrained(folder)


def save_model(name: str, folder, config: dict | None = None, preprocess: dict | None = None, seed: int = 0):
    """Random weights of ``name`` as an HF Hub repo holds them: weights, open_clip_config.json, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    if config is not None:
        config_json = {"model_cfg": config, "preprocess_cfg": preprocess or {}}
        (folder / "open_clip_config.json").write_text(json.dumps(config_json))
    save_tokenizer(folder)
    return folder


def extract(data_root, cache, backbone, *args, expect=0, split="test"):
    return run_cli("extract", "--backbone", backbone, "--dataset", "toy", "--split", split, "--data-root", data_root,
                   "--cache", cache, "--workers", 0, *args, expect=expect)


def load(cache, backbone, split="test"):
    store = FeatureStore.at(cache, "toy", split, store_name(backbone))
    return store.load("images"), store.load("texts"), store.root


def assert_loaded(backbone_spec: str, weights_file, **options) -> None:
    """The backbone built from the spec holds exactly the saved weights (nothing random left)."""
    from extract.backbones import BackboneOptions, create

    module = create(backbone_spec, BackboneOptions(**options)).module
    saved = load_file(weights_file)
    state = module.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)


def test_siglip_style_model_from_a_local_folder_stores_its_patch_tokens(tiny_models, tiny_data, tmp_path):
    folder = save_model("tiny-siglip-test", tmp_path / "siglip-dl", TINY["tiny-siglip-test"], SIGLIP_PREPROCESS)
    spec = f"open_clip:tiny-siglip-test@{folder}"
    extract(tiny_data, tmp_path / "c", spec, "--clip-tokens")
    images, texts, root = load(tmp_path / "c", spec)
    assert root.name == "open_clip.tiny-siglip-test@siglip-dl"
    assert set(np.diff(images.offsets)) == {1 + 4 * 4} and images.tokens.shape[1] == 64  # global + 4x4 patches
    np.testing.assert_allclose(images.tokens[::17].astype(np.float32), images.raw_embeds, rtol=2e-2, atol=2e-3)
    attrs = read_shard_attrs(root / "images-00000.h5")
    assert "mean=[0.5, 0.5, 0.5]" in attrs["preprocessing"] and attrs["clip_tokens"]  # SigLIP's, not OpenAI's
    assert len(texts) == 49 and np.isfinite(texts.embeds).all()
    assert_loaded(spec, folder / "open_clip_model.safetensors")


def test_timm_patch_tokens_go_through_the_same_head_as_the_pooled_feature(tiny_models):
    """EVA-style class-token pooling: the class token through the per-token head is exactly encode_image."""
    from extract.backbones.open_clip_tokens import per_token_head, pooled_and_patches

    torch.manual_seed(0)
    model = open_clip.create_model("tiny-eva-test").eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        states = model.visual.trunk.forward_features(pixels)
        pooled, patches = pooled_and_patches(model.visual, pixels)
        torch.testing.assert_close(per_token_head(model.visual, states)[:, 0], model.encode_image(pixels))
    torch.testing.assert_close(pooled, model.encode_image(pixels))
    assert patches.shape == (2, 16, 32)  # trunk width 64 projected to the embedding width 32


def test_two_open_clip_models_side_by_side_fused_by_spec(tiny_models, tiny_data, tmp_path):
    specs = [f"open_clip:tiny-siglip-test@{save_model('tiny-siglip-test', tmp_path / 'a')}",
             f"open_clip:tiny-eva-test@{save_model('tiny-eva-test', tmp_path / 'b')}"]
    for spec in specs:
        for split in ("train", "val", "test"):
            extract(tiny_data, tmp_path / "c", spec, "--clip-tokens", split=split)
    assert sorted(p.name for p in (tmp_path / "c" / "toy" / "test").iterdir()) == \
        ["index.json", "open_clip.tiny-eva-test@b", "open_clip.tiny-siglip-test@a"]
    run_cli("fuse", "--dataset", "toy", "--backbones", ",".join(specs), "--cache", tmp_path / "c",
            "--runs", tmp_path / "runs", "--epochs", 1, "--run", "r", *TINY_FUSE)
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert config["backbones"] == ["open_clip.tiny-siglip-test@a", "open_clip.tiny-eva-test@b"]
    run_cli("score", "--dataset", "toy", "--cache", tmp_path / "c", "--runs", tmp_path / "runs", "--run", "r",
            "--json", tmp_path / "s.json")
    rows = [r["method"] for r in json.loads((tmp_path / "s.json").read_text())["rows"]]
    assert rows == [*config["backbones"], "late-fusion", "hada"]
    # Without --backbones: the stores' recorded specs (their names cannot be parsed back into specs).
    run_cli("fuse", "--dataset", "toy", "--cache", tmp_path / "c", "--runs", tmp_path / "runs", "--epochs", 1,
            "--run", "found", *TINY_FUSE)
    found = json.loads((tmp_path / "runs" / "found" / "config.json").read_text())
    assert found["backbones"] == sorted(config["backbones"]) and found["config"]["backbones"] == ",".join(
        sorted(specs, key=lambda spec: store_name(spec)))


def test_bad_weights_and_folders_are_refused_before_anything_is_written(tiny_models, tiny_data, tmp_path):
    eva = save_model("tiny-eva-test", tmp_path / "eva", TINY["tiny-eva-test"])
    out = extract(tiny_data, tmp_path / "c", f"open_clip:tiny-siglip-test@{eva}", expect=2).output
    assert "holds another architecture than tiny-siglip-test" in out and "embed_dim" in out

    bad = save_model("tiny-siglip-test", tmp_path / "bad")
    weights = load_file(bad / "open_clip_model.safetensors")
    weights.pop("logit_scale")
    save_file(weights, bad / "open_clip_model.safetensors")
    out = extract(tiny_data, tmp_path / "c", f"open_clip:tiny-siglip-test@{bad}", expect=2).output
    assert "could not load into tiny-siglip-test" in out and "logit_scale" in out

    (tmp_path / "empty").mkdir()
    out = extract(tiny_data, tmp_path / "c", f"open_clip:tiny-siglip-test@{tmp_path / 'empty'}", expect=2).output
    assert "no open_clip weights" in out and "open_clip_model.safetensors" in out

    lone = tmp_path / "lone" / "weights.safetensors"  # no tokenizer beside it, none in the HF cache
    lone.parent.mkdir()
    save_file(load_file(save_model("tiny-siglip-test", tmp_path / "a") / "open_clip_model.safetensors"), lone)
    out = extract(tiny_data, tmp_path / "c", f"open_clip:tiny-siglip-test@{lone}", expect=2).output
    assert "tokenizer timm/not-cached-here not found" in out and "--checkpoint" in out
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_full_size_siglip2_from_a_downloaded_folder(tiny_data, tmp_path, one_thread):
    """ViT-B-16-SigLIP2 (375 M parameters), random weights: patch tokens 14 x 14 x 768, webli preprocessing."""
    folder = save_model("ViT-B-16-SigLIP2", tmp_path / "ViT-B-16-SigLIP2")
    spec = f"open_clip:ViT-B-16-SigLIP2@{folder}"
    extract(tiny_data, tmp_path / "c", spec, "--clip-tokens", "--batch-size", 8)
    images, texts, root = load(tmp_path / "c", spec)
    assert set(np.diff(images.offsets)) == {1 + 14 * 14} and images.tokens.shape[1] == 768
    assert texts.embeds.shape == (49, 768)
    assert "mean=(0.5, 0.5, 0.5)" in read_shard_attrs(root / "images-00000.h5")["preprocessing"]  # webli's
    assert_loaded(spec, folder / "open_clip_model.safetensors")


@pytest.mark.slow
def test_full_size_clip_from_a_weights_file_with_the_tag_it_holds(tiny_data, tmp_path, one_thread):
    """ViT-B-32-quickgelu, random weights in one file; the spec's tag names them, --checkpoint says where they are."""
    torch.manual_seed(0)
    file = tmp_path / "downloads" / "vit-b-32-openai.safetensors"
    file.parent.mkdir()
    save_file({k: v.contiguous() for k, v in open_clip.create_model("ViT-B-32-quickgelu").state_dict().items()}, file)
    spec = "open_clip:ViT-B-32-quickgelu@openai"
    extract(tiny_data, tmp_path / "c", spec, "--checkpoint", file, "--clip-tokens")
    images, texts, root = load(tmp_path / "c", spec)
    assert root.name == "open_clip.ViT-B-32-quickgelu@openai"
    assert set(np.diff(images.offsets)) == {1 + 7 * 7} and images.tokens.shape[1] == 512
    assert read_shard_attrs(root / "images-00000.h5")["checkpoint"] == str(file)
    assert_loaded(spec, file, checkpoint=str(file))


def test_the_default_tag_fits_the_models_activation():
    """A plain model defaults to its first weights trained without QuickGELU (ViT-B-32's first tag, openai,
    needs the -quickgelu variant); a model all of whose weights need the other variant is refused by name."""
    from extract.backbones.open_clip_source import default_tag

    assert default_tag("ViT-B-32-quickgelu", "--backbone") == "openai"
    tag = default_tag("ViT-B-32", "--backbone")
    assert tag != "openai" and not open_clip.get_pretrained_cfg("ViT-B-32", tag).get("quick_gelu", False)
    with pytest.raises(PipelineError, match="use the -quickgelu variant of RN50"):
        default_tag("RN50", "--backbone")
