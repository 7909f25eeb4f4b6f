"""The `albef` backbone: ALBEF and LAVIS retrieval checkpoints on transformers modules give the features ALBEF's own
equations give on the same random weights (tests/albef_oracle.py); ALBEF's preprocessing; keys refused by name."""
import albef_oracle as oracle
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from data.errors import PipelineError
from extract.backbones import available, create
from extract.backbones.base import BackboneOptions

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["A red circle, on the LEFT!", "a small-green square/star", "the large blue star on the right of a grey one"]


@pytest.fixture
def tokenizer_folder(tmp_path):
    from transformers import BertTokenizer

    from extract.backbones.blip import tiny_vocabulary

    BertTokenizer(vocab=tiny_vocabulary(), do_lower_case=True).save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def vocab_size():
    from extract.backbones.blip import tiny_vocabulary

    return len(tiny_vocabulary())


def save(path, state, layout):
    """The checkpoint as each code base writes it: ALBEF's bare state dict, LAVIS's under 'model' without
    token-type embeddings, or a BertForMaskedLM's text_encoder.bert.* names."""
    if layout == "lavis":
        state = {"model": state}
    elif layout == "bert-names":
        state = {k.replace("text_encoder.", "text_encoder.bert.", 1) if k.startswith("text_encoder.") else k: v
                 for k, v in state.items()}
    torch.save(state, path)
    return path


@pytest.mark.parametrize("layout", ["albef", "lavis", "bert-names"])
def test_features_equal_albefs_equations(tmp_path, tokenizer_folder, layout):
    state = oracle.random_state(vocab_size(), token_types=layout != "lavis", seed=1)
    path = save(tmp_path / "flickr30k.pth", state, layout)
    b = create(f"albef@{path}", BackboneOptions(processor=str(tokenizer_folder)))
    d = b.describe()
    assert (d["text_layers"], d["token_type_embeddings"], d["image_size"], d["vision_layer_norm_eps"]) == \
        (2, layout != "lavis", 64, 1e-6)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (48 + 10 * k, 60, 3), dtype=np.uint8)) for k in range(3)]
    px = torch.stack([b.eval_transform()(p) for p in pictures])
    tok = b.tokenize(CAPTIONS)
    ids, mask = tok.inputs["input_ids"], tok.inputs["attention_mask"]
    with torch.inference_mode():
        image, text = b.encode_images(px), b.encode_texts(tok.inputs)
        want = oracle.features(state, px, ids, mask)
    assert image.tokens.shape == (3, 17, 128) and image.proj.shape == (3, 32)
    torch.testing.assert_close(image.tokens, want["image_tokens"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(image.proj, want["image_proj"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(text.proj, want["text_proj"], atol=2e-5, rtol=1e-5)
    valid = mask.bool()
    torch.testing.assert_close(text.tokens[valid], want["text_tokens"][valid], atol=2e-5, rtol=1e-5)
    assert text.lengths.tolist() == mask.sum(1).tolist()
    # The fusion layers and the ITM head play no part: changing them changes nothing.
    changed = {k: v + 1 if k.startswith(("itm_head", "text_encoder.encoder.layer.3")) else v for k, v in state.items()}
    b2 = create(f"albef@{save(tmp_path / 'changed.pth', changed, layout)}",
                BackboneOptions(processor=str(tokenizer_folder)))
    with torch.inference_mode():
        assert torch.equal(b2.encode_texts(tok.inputs).tokens, text.tokens)


def test_albefs_caption_cleaning_and_tokens(tokenizer_folder, tmp_path):
    from extract.backbones.text import albef_clean

    assert albef_clean("A man's dog-house, on the LEFT!  <person>/x\n") == "a mans dog house on the left person x"
    assert albef_clean(" ".join(["red"] * 40)) == " ".join(["red"] * 30)  # 30 words
    path = save(tmp_path / "a.pth", oracle.random_state(vocab_size()), "albef")
    b = create(f"albef@{path}", BackboneOptions(processor=str(tokenizer_folder)))
    tok = b.tokenize(["red circle", "red " * 40])
    ids = tok.inputs["input_ids"]
    cls, sep = b.tokenizer.cls_token_id, b.tokenizer.sep_token_id
    red, circle = b.tokenizer.convert_tokens_to_ids(["red", "circle"])
    assert ids[0, :3].tolist() == [cls, red, circle] and tok.node_rows.tolist() == [3, 30]  # [CLS], no [SEP]
    assert (ids == sep).sum() == 0 and ids[1].tolist() == [cls] + [red] * 29 and tok.truncated == 1


def test_keys_refused_by_name(tmp_path, tokenizer_folder):
    state = oracle.random_state(vocab_size())

    def refused(changed, match):
        with pytest.raises(PipelineError, match=match):
            create(f"albef@{save(tmp_path / 'bad.pth', changed, 'albef')}",
                   BackboneOptions(processor=str(tokenizer_folder)))

    refused({k: v for k, v in state.items() if k != "text_encoder.encoder.layer.1.output.LayerNorm.bias"},
            r"albef@.*bad\.pth: missing 1 keys: text_encoder\.encoder\.layer\.1\.output\.LayerNorm\.bias$")
    refused({**state, "text_encoder.cls.predictions.bias": torch.zeros(3)},  # a pre-training checkpoint's MLM head
            r"1 keys are neither mapped nor known to be unused: text_encoder\.cls\.predictions\.bias")
    refused({**state, "text_proj.weight": state["text_proj.weight"].T},
            r"1 keys of the wrong shape: text_proj\.weight \(128, 32\) \(expected \(32, 128\)\)")
    with pytest.raises(PipelineError, match="albef needs its weights"):
        create("albef")
    with pytest.raises(PipelineError, match="albef reads a checkpoint file"):
        create(f"albef@{tokenizer_folder}")


def test_extract_lists_and_stores_albef_nodes(tiny_data, tmp_path, tokenizer_folder):
    from data.store import FeatureStore

    assert "albef@<weights>" in available() and "albef-tiny" in available()
    assert "albef@<weights>" in run_cli("backbones").output
    path = save(tmp_path / "mscoco.pth", oracle.random_state(vocab_size()), "albef")
    run_cli("extract", "--backbone", f"albef@{path}", "--processor", tokenizer_folder, "--dataset", "toy", "--split",
            "test", "--data-root", tiny_data, "--cache", tmp_path / "c", "--workers", 0)
    store = FeatureStore.at(tmp_path / "c", "toy", "test", "albef@mscoco")
    images, texts = store.load("images"), store.load("texts")
    assert set(np.diff(images.offsets)) == {17} and images.tokens.shape[1] == 128 and images.embeds.shape[1] == 32
    b = create(f"albef@{path}", BackboneOptions(processor=str(tokenizer_folder)))
    from data.datasets import load_split, resolve

    captions = load_split(resolve("toy", tiny_data), "test").captions
    assert np.diff(texts.offsets).tolist() == b.tokenize(list(captions)).node_rows.tolist()
    run_cli("extract", "--backbone", "albef-tiny", "--dataset", "toy", "--split", "test", "--data-root", tiny_data,
            "--cache", tmp_path / "c", "--workers", 0)
    assert set(np.diff(FeatureStore.at(tmp_path / "c", "toy", "test", "albef-tiny").load("images").offsets)) == {17}
