"""BLIP-2 (transformers Blip2ForImageTextRetrieval): Q-Former query nodes, the model's own ITC score, local weights."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from data.backbone_spec import store_name
from data.datasets import load_split, resolve
from data.store import FeatureStore
from evaluate.recall import retrieval_recall


def extract(data_root, cache, backbone, *args, expect=0):
    return run_cli("extract", "--backbone", backbone, "--dataset", "toy", "--data-root", data_root, "--cache", cache,
                   "--workers", 0, *args, expect=expect)


def load(cache, backbone, split="test"):
    store = FeatureStore.at(cache, "toy", split, store_name(backbone))
    return store.load("images", queries=True), store.load("texts")


def save_tiny_blip2(folder):
    from extract.backbones.blip2 import tiny_blip2

    for part in tiny_blip2():
        part.save_pretrained(folder)
    return folder


def test_nodes_and_embeddings_are_the_q_formers_and_score_as_the_model_does(tiny_data, tmp_path):
    from extract.backbones import create
    from extract.reader import load_rgb

    extract(tiny_data, tmp_path / "c", "blip2-tiny")
    images, texts = load(tmp_path / "c", "blip2-tiny")
    b = create("blip2-tiny")
    assert set(np.diff(images.offsets)) == {1 + 8}  # the mean of the 8 queries, then each query
    assert images.query_embeds.shape == (8, 8, 16)
    np.testing.assert_allclose(np.linalg.norm(images.query_embeds, axis=-1), 1, atol=1e-5)
    tokens = torch.from_numpy(images.tokens.astype(np.float32)).reshape(8, 9, 32)
    np.testing.assert_allclose(tokens[:, 0], tokens[:, 1:].mean(1), atol=5e-3)  # global node = mean query (fp16)
    with torch.inference_mode():  # the stored embedding is the projection of the global node
        proj = torch.nn.functional.normalize(b.module.vision_projection(tokens[:, 0]), dim=-1)
    np.testing.assert_allclose(proj.numpy(), images.embeds, atol=5e-3)
    lengths = np.diff(texts.offsets)
    assert len(set(lengths)) > 1 and lengths.max() <= 35  # Q-Former text tokens, padding stripped

    index = load_split(resolve("toy", tiny_data), "test")
    px = torch.stack([b.eval_transform()(load_rgb(tiny_data / "toy" / "images" / p)) for p in index.images])
    tok = b.tokenize(list(index.captions[:4]))
    with torch.inference_mode():
        itc = b.module(pixel_values=px, input_ids=tok.inputs["input_ids"], attention_mask=tok.inputs["attention_mask"],
                       use_image_text_matching_head=False).logits_per_image
    best_query = np.einsum("iqd,td->itq", images.query_embeds, texts.embeds[:4]).max(-1)
    np.testing.assert_allclose(best_query, itc.numpy(), atol=1e-5)


def test_backbone_row_scores_with_the_best_query(tiny_data, tmp_path):
    extract(tiny_data, tmp_path / "c", "blip2-tiny")
    extract(tiny_data, tmp_path / "c", "blip2-tiny", "--split", "val")
    run_cli("score", "--dataset", "toy", "--cache", tmp_path / "c", "--runs", tmp_path / "runs",
            "--json", tmp_path / "s.json")
    import json

    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    images, texts = load(tmp_path / "c", "blip2-tiny")
    t2i = load_split(resolve("toy", tiny_data), "test").text_to_image
    best = retrieval_recall(torch.from_numpy(np.einsum("iqd,td->itq", images.query_embeds, texts.embeds).max(-1)), t2i)
    single = retrieval_recall(torch.from_numpy(images.embeds @ texts.embeds.T), t2i)
    assert row["method"] == "blip2-tiny"
    assert single["rsum"] != pytest.approx(best["rsum"])  # the two ways of scoring differ here
    assert row["rsum"] == pytest.approx(best["rsum"])


def test_local_folder_loads_like_the_tiny_preset_into_its_own_store(tiny_data, tmp_path):
    """The same weights as blip2-tiny, read from a folder into their own store; `blip2` computes its vision norms
    at LAVIS's eps, so the preset is compared at those."""
    from extract.backbones.blip2 import Blip2, tiny_blip2
    from extract.reader import load_rgb

    folder = save_tiny_blip2(tmp_path / "blip2-local")
    extract(tiny_data, tmp_path / "c", f"blip2@{folder}")
    assert (tmp_path / "c" / "toy" / "test" / "blip2@blip2-local" / "manifest.json").is_file()
    a, _ = load(tmp_path / "c", f"blip2@{folder}")
    b = Blip2("preset", *tiny_blip2(), "random-init(seed=0)", lavis_eps=True)
    index = load_split(resolve("toy", tiny_data), "test")
    px = torch.stack([b.eval_transform()(load_rgb(tiny_data / "toy" / "images" / p)) for p in index.images])
    with torch.inference_mode():
        want = b.encode_images(px)
    normalise = torch.nn.functional.normalize
    np.testing.assert_allclose(a.query_embeds, normalise(want.queries, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(a.embeds, normalise(want.proj, dim=-1).numpy(), atol=1e-5)


def test_another_architecture_or_mismatched_weights_are_refused(tiny_data, tmp_path):
    from extract.backbones.blip import tiny_blip

    blip_folder = tmp_path / "blip-local"
    for part in tiny_blip():
        part.save_pretrained(blip_folder)
    out = extract(tiny_data, tmp_path / "c", f"blip2@{blip_folder}", expect=2).output
    assert "holds BlipForImageTextRetrieval" in out and "not Blip2ForImageTextRetrieval" in out

    folder = save_tiny_blip2(tmp_path / "blip2-bad")
    weights = load_file(folder / "model.safetensors")
    weights["itm_head.weight"] = weights.pop("text_projection.weight")  # one key missing, one of another shape
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    out = extract(tiny_data, tmp_path / "c", "blip2", "--checkpoint", folder, expect=2).output
    assert "weights do not match Blip2ForImageTextRetrieval" in out
    assert "text_projection.weight" in out and "itm_head.weight" in out
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_full_width_blip2_loads_from_a_local_folder(tiny_data, tmp_path, one_thread):
    """BLIP-2 ViT-g widths (1408) and the full Q-Former (12 layers, 768, 32 queries, 256-d ITC), random weights
    saved the way a downloaded checkpoint is; the vision tower has 2 of its 39 layers to fit a CPU test."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    from extract.backbones.blip import tiny_blip
    from extract.backbones.blip2 import tiny_blip2

    torch.manual_seed(0)
    config = Blip2Config(vision_config=dict(num_hidden_layers=2),
                         qformer_config=dict(use_qformer_text_input=True, vocab_size=30523))
    folder = tmp_path / "blip2-itm-vit-g"
    Blip2ForImageTextRetrieval(config).save_pretrained(folder)
    _, tokenizer, _ = tiny_blip2()
    tokenizer.save_pretrained(folder)
    _, _, processor = tiny_blip()
    processor.size = {"height": 224, "width": 224}
    processor.save_pretrained(folder)
    out = extract(tiny_data, tmp_path / "c", f"blip2@{folder}", "--batch-size", 4).output
    assert "8 image rows" in out
    images, texts = load(tmp_path / "c", f"blip2@{folder}")
    assert set(np.diff(images.offsets)) == {33} and images.tokens.shape[1] == 768
    assert images.query_embeds.shape == (8, 32, 256) and texts.embeds.shape[1] == 256 and texts.tokens.shape[1] == 768


def test_vision_layer_norms_compute_as_lavis_does(tmp_path):
    """EVA ViT blocks at eps 1e-6 (LAVIS's create_eva_vit_g), the norm after it at torch's 1e-5 (LAVIS's ln_vision),
    whatever the weights' config says; recorded in the store's settings."""
    from extract.backbones import create

    folder = save_tiny_blip2(tmp_path / "blip2-local")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["layer_norm_eps"] = 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    b = create(f"blip2@{folder}")
    vision = b.module.vision_model
    blocks = {m.eps for m in vision.encoder.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert blocks == {1e-6} and vision.post_layernorm.eps == 1e-5
    assert (b.describe()["vision_layer_norm_eps"], b.describe()["vision_post_layernorm_eps"]) == (1e-6, 1e-5)
    assert "vision_layer_norm_eps" not in create("blip2-tiny").describe()  # the tiny test model keeps its config's
