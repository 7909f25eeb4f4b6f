"""Backbone specs: the grammar, the store folder each spec maps to, and refusals of bad specs."""
import pytest

from conftest import run_cli
from data.backbone_spec import BackboneSpec, parse_spec, parse_specs, store_name
from data.errors import PipelineError


@pytest.mark.parametrize("spec,store", [
    ("blip", "blip"),
    ("clip", "clip"),
    ("blip-tiny", "blip-tiny"),
    ("blip2", "blip2"),
    ("open_clip:ViT-SO400M-14-SigLIP2-378@webli", "open_clip.ViT-SO400M-14-SigLIP2-378@webli"),
    ("open_clip:ViT-L-16-SigLIP2-384", "open_clip.ViT-L-16-SigLIP2-384"),
    ("blip2@Salesforce/blip2-itm-vit-g", "blip2@Salesforce.blip2-itm-vit-g"),
    ("blip2@/models/blip2 coco/", "blip2@blip2_coco"),
    ("open_clip:ViT-B-32@~/weights/vit-b-32.safetensors", "open_clip.ViT-B-32@vit-b-32"),
    ("open_clip:ViT-B-16-SigLIP2@hf-hub:timm/ViT-B-16-SigLIP2",
     "open_clip.ViT-B-16-SigLIP2@hf-hub.timm.ViT-B-16-SigLIP2"),
])
def test_store_names_are_derived_from_the_spec(spec, store):
    assert store_name(spec) == store
    assert all(c.isalnum() or c in "._-@" for c in store)


@pytest.mark.parametrize("weights,store", [
    ("cache/demo-weights/blip-demo-897ac1c5", "blip-demo@blip-demo-897ac1c5"),  # relative, existing
    ("./cache/demo-weights/blip-demo-897ac1c5", "blip-demo@blip-demo-897ac1c5"),
    ("{tmp}/cache/demo-weights/blip-demo-897ac1c5", "blip-demo@blip-demo-897ac1c5"),  # absolute
    ("cache/demo-weights/blip-demo-897ac1c5/", "blip-demo@blip-demo-897ac1c5"),
    ("elsewhere/demo-weights/blip-demo-0", "blip-demo@blip-demo-0"),  # two '/': a path even where it is not
    ("local/blip-demo-1", "blip-demo@local.blip-demo-1"),  # org/name form: named as an HF id, folder or not
    ("./local/blip-demo-1", "blip-demo@blip-demo-1"),
    ("Salesforce/blip-itm-large-coco", "blip-demo@Salesforce.blip-itm-large-coco"),  # an HF id
    ("hf-hub:timm/ViT-B-16-SigLIP2", "blip-demo@hf-hub.timm.ViT-B-16-SigLIP2"),
])
def test_every_local_path_is_named_by_its_last_component(tmp_path, monkeypatch, weights, store):
    """By syntax alone: the same spec names the same store from any folder, whatever exists there."""
    (tmp_path / "cache" / "demo-weights" / "blip-demo-897ac1c5").mkdir(parents=True)
    (tmp_path / "local" / "blip-demo-1").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for folder in (tmp_path, tmp_path / "elsewhere"):
        monkeypatch.chdir(folder)
        assert store_name("blip-demo@" + weights.format(tmp=tmp_path)) == store


def test_parse_round_trips_and_splits_lists():
    spec = parse_spec(" open_clip:ViT-L-16-SigLIP2-384@webli ")
    assert spec == BackboneSpec("open_clip", "ViT-L-16-SigLIP2-384", "webli")
    assert str(spec) == "open_clip:ViT-L-16-SigLIP2-384@webli"
    assert [s.store_name for s in parse_specs("blip-tiny, clip-tiny,open_clip:ViT-B-32@openai")] == \
        ["blip-tiny", "clip-tiny", "open_clip.ViT-B-32@openai"]


@pytest.mark.parametrize("spec,words", [
    ("", "empty"),
    ("Blip", "not a backbone family"),
    ("open_clip:@webli", "not a model name"),
    ("blip2@", "nothing after '@'"),
    ("open_clip:ViT B", "not a model name"),
    ("blip,clip", "comma"),
])
def test_bad_syntax_is_named(spec, words):
    with pytest.raises(PipelineError, match=words):
        parse_spec(spec)


@pytest.mark.parametrize("spec,words", [
    ("blipp", "did you mean 'blip'"),
    ("open_clip", "name the model"),
    ("blip:ViT-B-32", "takes no model name"),
    ("clip-tiny@openai", "takes no weights"),
    ("open_clip:ViT-B-33", "ViT-B-32"),
    ("open_clip:ViT-B-32@laion9", "not a pretrained tag of ViT-B-32"),
    ("open_clip:ViT-B-32@openai", "QuickGELU"),
    ("open_clip:ViT-B-32@./missing.safetensors", "no such file"),
    ("blip2@./missing-folder", "--backbone blip2@./missing-folder: no such folder"),
    ("blip2@missing/deeper/folder", "--backbone blip2@missing/deeper/folder: no such folder"),
])
def test_bad_specs_fail_with_one_error_line_and_write_nothing(tiny_data, tmp_path, spec, words):
    out = run_cli("extract", "--backbone", spec, "--dataset", "toy", "--data-root", tiny_data,
                  "--cache", tmp_path / "c", "--workers", 0, expect=2).output
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in out, out
    assert not (tmp_path / "c").exists()


def test_model_flag_is_for_the_clip_store_only(tiny_data, tmp_path):
    out = run_cli("extract", "--backbone", "open_clip:ViT-B-32", "--model", "ViT-B-16", "--dataset", "toy",
                  "--data-root", tiny_data, "--cache", tmp_path / "c", expect=2).output
    assert "--model applies to the clip backbone only" in out


def test_fuse_names_a_bad_or_missing_spec(demo_cache, tmp_path):
    _, cache = demo_cache
    out = run_cli("fuse", "--dataset", "demo", "--backbones", "blip-tiny,open_clip:ViT-B-32@openai", "--cache", cache,
                  "--runs", tmp_path, expect=2).output
    assert "open_clip.ViT-B-32@openai" in out and "pipeline extract" in out
    out = run_cli("fuse", "--dataset", "demo", "--backbones", "blip-tiny,Clip", "--cache", cache, "--runs", tmp_path,
                  expect=2).output
    assert "'Clip' is not a backbone family" in out
    assert not any(tmp_path.iterdir())


def test_backbones_lists_families_and_open_clip_models():
    out = run_cli("backbones").output
    for text in ("blip2[@<weights>]", "open_clip:<model>[@<weights>]", "blip2-tiny", "blip-demo@<weights> ",
                 "clip-demo@<weights> ",
                 "ViT-SO400M-14-SigLIP2-378  @webli",
                 "ViT-L-16-SigLIP2-384  @webli", "EVA02-L-14"):
        assert text in out, text
    assert "blip-demo[@" not in out and "clip-demo[@" not in out  # their weights are required
