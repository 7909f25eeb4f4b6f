"""LAVIS / BLIP-repository retrieval checkpoints (.pth) through `blip@file.pth`: the same features as the transformers
folder they were made from, both with BLIP's vision LayerNorm eps 1e-6; every key mapped, or refused by name."""
import datetime
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from data.errors import PipelineError
from extract.backbones import create
from extract.backbones.base import BackboneOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def small_config():
    """BlipForImageTextRetrieval with 64-wide heads (as every BLIP checkpoint: heads are not in the tensors)."""
    from transformers import BlipConfig

    from extract.backbones.blip import tiny_vocabulary

    return BlipConfig(vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=64, patch_size=16, initializer_range=0.02),
                      text_config=dict(vocab_size=len(tiny_vocabulary()), hidden_size=128, intermediate_size=256,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40,
                                       encoder_hidden_size=128, initializer_range=0.02),
                      image_text_hidden_size=32)


def full_config():
    """BLIP ViT-B/16 at 384 px with BERT-base, as Salesforce/blip-itm-base-* (vision eps 1e-5 in its config)."""
    from transformers import BlipConfig

    return BlipConfig(vision_config=dict(initializer_range=0.02), text_config=dict(num_attention_heads=12))


def lavis_state(model) -> dict:
    """LAVIS's BlipRetrieval state dict for a transformers model, written from LAVIS's module names (not from the
    key map under test), with the momentum copies, queues, temperature and position ids LAVIS saves."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    v = "vision_model."
    out = {"visual_encoder.cls_token": sd[v + "embeddings.class_embedding"],
           "visual_encoder.pos_embed": sd[v + "embeddings.position_embedding"]}
    for p in ("weight", "bias"):
        out["visual_encoder.patch_embed.proj." + p] = sd[v + "embeddings.patch_embedding." + p]
        out["visual_encoder.norm." + p] = sd[v + "post_layernorm." + p]
        for i in range(model.config.vision_config.num_hidden_layers):
            ours, theirs = f"{v}encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
            for a, b in (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
                         ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{theirs}{a}.{p}"] = sd[f"{ours}{b}.{p}"]
    same_names = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
    out.update({k: t for k, t in sd.items() if k.startswith(same_names)})
    out["text_encoder.embeddings.position_ids"] = torch.arange(model.config.text_config.max_position_embeddings)[None]
    for prefix in ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."):
        out.update({prefix[:-1] + "_m." + k[len(prefix):]: t for k, t in list(out.items()) if k.startswith(prefix)})
    embed = model.config.image_text_hidden_size
    out.update(image_queue=torch.randn(embed, 8), text_queue=torch.randn(embed, 8), idx_queue=torch.full((1, 8), -100),
               queue_ptr=torch.zeros(1, dtype=torch.long), temp=torch.tensor(0.07))
    return out


def blip_folder_and_pth(tmp_path, config, seed=0):
    """(a save_pretrained folder with a tokenizer and image processor, the LAVIS .pth of the same weights)."""
    from transformers import BertTokenizer, BlipForImageTextRetrieval
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from extract.backbones.blip import tiny_vocabulary

    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config).eval()
    folder, size = tmp_path / "hf", config.vision_config.image_size
    model.save_pretrained(folder)
    BertTokenizer(vocab=tiny_vocabulary(), do_lower_case=True).save_pretrained(folder)
    BlipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    path = tmp_path / "blip_coco_retrieval.pth"
    torch.save({"model": lavis_state(model)}, path)
    return folder, path


def images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * k, 56, 3), dtype=np.uint8)) for k in range(n)]


CAPTIONS = ["A red circle on the left!", "a small green square", "the large blue star on the right of a grey one"]


def same_features(folder, path):
    """The folder and the .pth give the same pixels, tokens and features; both with every vision norm at 1e-6."""
    import json

    assert json.loads((folder / "config.json").read_text())["vision_config"]["layer_norm_eps"] == 1e-5
    a = create(f"blip@{folder}")
    b = create(f"blip@{path}", BackboneOptions(processor=str(folder)))
    for backbone in (a, b):
        norms = [m for m in backbone.module.vision_model.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert len(norms) == 2 * backbone.module.config.vision_config.num_hidden_layers + 1
        assert {m.eps for m in norms} == {1e-6} and backbone.describe()["vision_layer_norm_eps"] == 1e-6
    assert b.describe()["processor"] == str(folder) and b.describe()["checkpoint"] == str(path)
    px = torch.stack([a.eval_transform()(im) for im in images()])
    assert torch.equal(px, torch.stack([b.eval_transform()(im) for im in images()]))
    ta, tb = a.tokenize(CAPTIONS), b.tokenize(CAPTIONS)
    assert torch.equal(ta.inputs["input_ids"], tb.inputs["input_ids"])
    with torch.inference_mode():
        for x, y in ((a.encode_images(px), b.encode_images(px)),
                     (a.encode_texts(ta.inputs), b.encode_texts(tb.inputs))):
            torch.testing.assert_close(x.tokens, y.tokens, atol=1e-6, rtol=0)
            torch.testing.assert_close(x.proj, y.proj, atol=1e-6, rtol=0)
    # The eps is in play: the same weights at the config's 1e-5 give other vision tokens.
    from extract.backbones.lavis_vit import set_layer_norm_eps

    set_layer_norm_eps(b.module.vision_model, 1e-5)
    with torch.inference_mode():
        assert not torch.equal(b.encode_images(px).tokens, a.encode_images(px).tokens)


def test_a_lavis_pth_gives_the_features_of_the_folder_it_was_made_from(tmp_path):
    same_features(*blip_folder_and_pth(tmp_path, small_config()))


@pytest.mark.slow
def test_a_full_size_lavis_pth_gives_the_features_of_the_folder_it_was_made_from(tmp_path):
    """ViT-B/16 at 384 px and BERT-base (224 M parameters, random): the config read off the tensors is the model's."""
    same_features(*blip_folder_and_pth(tmp_path, full_config()))


def test_keys_not_mapped_or_not_filled_are_refused_by_name(tmp_path):
    folder, path = blip_folder_and_pth(tmp_path, small_config())
    state = torch.load(path, weights_only=True)["model"]

    def refused(changed: dict, match: str, **extra):
        bad = tmp_path / "bad.pth"
        torch.save({"model": changed, **extra}, bad)
        with pytest.raises(PipelineError, match=match):
            create(f"blip@{bad}", BackboneOptions(processor=str(folder)))

    refused({k: t for k, t in state.items() if k != "visual_encoder.blocks.1.norm2.bias"},
            r"blip@.*bad.pth: missing 1 keys: visual_encoder\.blocks\.1\.norm2\.bias$")
    refused({k: t for k, t in state.items() if k != "text_encoder.encoder.layer.0.crossattention.self.key.weight"},
            r"missing key text_encoder\.encoder\.layer\.0\.crossattention\.self\.key\.weight")  # the config's source
    refused({**state, "text_decoder.cls.predictions.bias": torch.zeros(3)},
            r"1 keys are neither mapped nor known to be unused: text_decoder\.cls\.predictions\.bias")
    refused({**state, "text_encoder.pooler.dense.weight": torch.zeros(3, 3)},
            r"1 keys have no place in the model: text_encoder\.pooler\.dense\.weight")
    refused({**state, "vision_proj.weight": state["vision_proj.weight"][:, :64]},
            r"keys of the wrong shape: vision_proj\.weight \(32, 64\) \(expected \(32, 128\)\)")
    refused(state, r"cannot be loaded safely: GLOBAL datetime\.date", config=datetime.date(2022, 1, 1))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(PipelineError, match="not a state dict"):
        create(f"blip@{tmp_path / 'list.pth'}", BackboneOptions(processor=str(folder)))


def test_the_processor_must_fit_and_is_looked_up_locally(tmp_path, monkeypatch, caplog):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformers import BertTokenizer
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from extract.backbones.blip import tiny_vocabulary

    folder, path = blip_folder_and_pth(tmp_path, small_config())
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "p32")
    BertTokenizer(vocab=tiny_vocabulary()).save_pretrained(tmp_path / "p32")
    with pytest.raises(PipelineError, match=r"--processor .*p32: the image processor resizes to .*expects 64 px"):
        create(f"blip@{path}", BackboneOptions(processor=str(tmp_path / "p32")))

    def not_cached(*args, **kwargs):
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(PipelineError, match="tokenizer and image processor Salesforce/blip-itm-base-flickr not found "
                                            r"\(not in the local Hugging Face cache\)\. Point --processor at a local"):
        create(f"blip@{path}", BackboneOptions(dataset="flickr30k"))
    # Default weights: the dataset's fine-tuned BLIP, said in one line; a name of neither dataset gets a warning.
    with caplog.at_level(logging.INFO, logger="pipeline.extract"), pytest.raises(PipelineError):
        create("blip", BackboneOptions(dataset="flickr30k"))
    assert "blip: weights Salesforce/blip-itm-base-flickr, fine-tuned on flickr30k (--dataset flickr30k)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.extract"), pytest.raises(PipelineError):
        create("blip", BackboneOptions(dataset="f30k-mine"))
    [record] = caplog.records
    assert record.levelname == "WARNING" and "--dataset f30k-mine is neither Flickr30k nor COCO" in record.message
    assert "COCO-finetuned Salesforce/blip-itm-base-coco" in record.message


def test_extract_from_a_pth_into_its_own_store(tiny_data, tmp_path):
    import json

    folder, path = blip_folder_and_pth(tmp_path, small_config())
    run_cli("extract", "--backbone", f"blip@{path}", "--processor", folder, "--dataset", "toy", "--split", "test",
            "--data-root", tiny_data, "--cache", tmp_path / "c", "--workers", 0)
    manifest = json.loads((tmp_path / "c/toy/test/blip@blip_coco_retrieval/manifest.json").read_text())
    fp = manifest["fingerprint"]
    assert fp["vision_layer_norm_eps"] == 1e-6 and fp["processor"] == str(folder) and fp["checkpoint"] == str(path)
    out = run_cli("extract", "--backbone", "clip-tiny", "--processor", folder, "--dataset", "toy", "--data-root",
                  tiny_data, "--cache", tmp_path / "c", expect=2).output
    assert "--processor applies to blip and albef" in out
