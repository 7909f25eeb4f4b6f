"""Whatever a user types: exit status 2 and one line `Error: ...` naming the bad piece, never a traceback."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import cli
from tests.conftest import write_karpathy


def refused(*args, names: str | tuple[str, ...]):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for name in (names,) if isinstance(names, str) else names:
        assert name in errors[0], errors[0]
    return errors[0]


def test_the_bare_command_lists_the_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 2 and "extract" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args,names", [
    (("extract",), "--backbone"),
    (("fuse",), ("cache", "pipeline extract")),
    (("score",), ("cache", "pipeline extract")),
    (("fuse", "--epochs", 20), "cache"),
    (("extract", "--backbone", "nosuch"), ("nosuch", "blip-tiny")),
    (("extract", "--backbone", "clip-tiny,nosuch"), "nosuch"),
    (("extract", "--backbone", ","), "--backbone"),
    (("extract", "--backbone", "blip-tiny"), ("datasets", "--dataset")),
    (("extract", "--backbone", "clip-tiny", "--dataset", "nosuch"), ("nosuch", "--dataset")),
    (("extract", "--backbone", "clip-tiny", "--split", "nosuch"), "--split"),
    (("extract", "--backbone", "clip-tiny", "--device", "nosuch"), "--device"),
    (("extract", "--backbone", "clip-tiny", "--precision", "fp8"), "--precision"),
    (("extract", "--backbone", "clip-tiny", "--batch-size", 0), "--batch-size"),
    (("extract", "--backbone", "clip-tiny", "--workers", -1), "--workers"),
    (("extract", "--backbone", "clip-tiny", "--scheduler", "nosuch"), "--scheduler"),
    (("extract", "--backbone", "clip-tiny", "--nosuch"), "--nosuch"),
    (("extract", "--backbone", "clip-tiny", "--dataset", "x", "--annotations", "nosuch.json"), "--images"),
    (("extract", "--backbone", "clip-tiny", "--dataset", "x", "--annotations", "nosuch.json", "--images", "."),
     "nosuch.json"),
    (("score", "--dataset", "nosuch"), "nosuch"),
    (("score", "--split", "nosuch"), "--split"),
    (("backbones", "--nosuch"), "--nosuch"),
    (("extract", "--backbone", "blip-tiny,clip-tiny", "--checkpoint", "w"), ("--checkpoint", "blip-tiny, clip-tiny")),
    (("extract", "--backbone", "clip-tiny,clip", "--model", "RN50"), "--model"),
    (("extract", "--backbone", "clip-tiny", "--views", 128), "--views"),
    (("extract", "--backbone", "clip-tiny", "--seed", 2**40), "--seed"),
    (("fuse", "--patience", 0), "--patience"),
    (("fuse", "--epochs", 0), "--epochs"),
    (("fuse", "--batch-size", 0), "--batch-size"),
    (("fuse", "--seed", 2**40), "--seed"),
    (("fuse", "--memory-gb", -1), "--memory-gb"),
    (("fuse", "--clean-prob", 2), "--clean-prob"),
    (("fuse", "--lr", 0), "--lr"),
    (("demo", "--epochs", "x"), "--epochs"),
    (("demo", "--workers", -1), "--workers"),
    (("demo", "--nosuch"), "--nosuch"),
    (("nosuch",), "nosuch"),
])
def test_in_an_empty_folder(tmp_path, monkeypatch, args, names):
    monkeypatch.chdir(tmp_path)
    refused(*args, names=names)


@pytest.fixture
def coco_folder(tmp_path, monkeypatch) -> Path:
    """A folder whose datasets/ holds a small COCO with train and test images only."""
    write_karpathy(tmp_path / "datasets", "coco", {"train": 4, "test": 3})
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("args,names", [
    (("--split", "val"), ("coco", "'val'")),
    (("--views", 1, "--split", "test"), "--views"),
    (("--scheduler", "distributed"), "--address"),
    (("--annotations", "datasets/coco/dataset_coco.json", "--images", "datasets/coco/images"), "--dataset"),
    (("--annotations", "datasets/coco/dataset_coco.json", "--dataset", "c2", "--split", "test", "--images", "nowhere",
      "--skip-bad"), "--images nowhere: no such folder"),
])
def test_extract_refusals_with_a_dataset(coco_folder, args, names):
    refused("extract", "--backbone", "clip-tiny", *args, names=names)
    assert not (coco_folder / "cache").exists()


def test_a_missing_image_folder_of_the_data_root(coco_folder):
    for image in (coco_folder / "datasets" / "coco" / "images").iterdir():
        image.unlink()
    (coco_folder / "datasets" / "coco" / "images").rmdir()
    refused("extract", "--backbone", "clip-tiny", "--skip-bad", names=("datasets/coco/images: no such folder",
                                                                      "--data-root datasets"))
    assert not (coco_folder / "cache").exists()


@pytest.mark.parametrize("args,names", [
    (("--backbone", "blip2@/nonexist/folder"), "Error: --backbone blip2@/nonexist/folder: no such folder"),
    (("--backbone", "blip2", "--checkpoint", "/nonexist/folder"),
     "Error: --checkpoint /nonexist/folder: no such folder"),
    (("--backbone", "clip@nonexist/deeper/w.safetensors"), "Error: --backbone clip@nonexist/deeper/w.safetensors: no "),
    (("--backbone", "open_clip:ViT-B-32@laion9"), "Error: --backbone open_clip:ViT-B-32@laion9: not a pretrained tag"),
    (("--backbone", "clip", "--model", "RN99"), "Error: --model: 'RN99' is not an open_clip model name"),
])
def test_weights_are_named_where_they_were_given(coco_folder, args, names):
    refused("extract", *args, "--split", "test", names=names)
    assert not (coco_folder / "cache").exists()


def test_a_cache_that_is_a_file(coco_folder):
    (coco_folder / "taken").write_text("not a folder")
    refused("extract", "--backbone", "clip-tiny", "--split", "test", "--cache", "taken", names="taken")
    assert (coco_folder / "taken").read_text() == "not a folder"


def test_several_datasets_need_a_choice(coco_folder):
    write_karpathy(coco_folder / "datasets", "flickr30k", {"test": 2})
    refused("extract", "--backbone", "clip-tiny", names=("coco, flickr30k", "--dataset"))


def test_score_sims_file_missing(coco_folder):
    refused("score", "--dataset", "coco", "--sims", "nosuch.npy", names="nosuch.npy")


def link_stores(cache: Path, into: Path, dataset: str, splits, backbones) -> Path:
    """A cache holding only some stores of another one (symlinks)."""
    for split in splits:
        (into / dataset / split).mkdir(parents=True, exist_ok=True)
        (into / dataset / split / "index.json").symlink_to(cache / dataset / split / "index.json")
        for b in backbones:
            (into / dataset / split / b).symlink_to(cache / dataset / split / b)
    return into


def test_fuse_and_score_refusals_with_a_cache(demo_cache, tmp_path, monkeypatch):
    _, cache = demo_cache
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    refused("fuse", "--cache", cache, "--dataset", "nosuch", names=("nosuch", "demo"))
    refused("fuse", "--cache", cache, "--backbones", "blip-tiny,nosuch", names=("nosuch", "blip-tiny, clip-tiny"))
    refused("fuse", "--cache", cache, "--backbones", "blip-tiny", names=("two or more", "clip-tiny"))
    refused("fuse", "--cache", cache, "--backbones", "blip-tiny,blip-tiny", names="two or more")
    one = link_stores(cache, tmp_path / "one", "demo", ("train", "val"), ("blip-tiny",))
    refused("fuse", "--cache", one, names=("two or more", "blip-tiny", "pipeline extract"))
    only_train = link_stores(cache, tmp_path / "only-train", "demo", ("train",), ("blip-tiny", "clip-tiny"))
    refused("fuse", "--cache", only_train, names=("train and val", "none"))
    two = link_stores(cache, tmp_path / "two", "demo", ("train", "val"), ("blip-tiny", "clip-tiny"))
    link_stores(cache, two, "demo", ("test",), ())
    (two / "other").symlink_to(cache / "demo")
    refused("fuse", "--cache", two, names=("demo, other", "--dataset"))
    refused("fuse", "--cache", cache, "--runs", runs, "--resume", "--run", "nosuch", names="nosuch")
    refused("fuse", "--cache", cache, "--runs", runs, "--init", "nosuch", names="nosuch")
    refused("score", "--cache", cache, "--runs", runs, "--run", "nosuch", names="nosuch")
    refused("score", "--cache", two, names=("demo, other", "--dataset"))
    (tmp_path / "taken").write_text("")
    refused("score", "--cache", cache, "--runs", runs, "--plot", tmp_path / "taken" / "recall.png", names="taken")
    (tmp_path / "a-folder").mkdir()
    refused("score", "--cache", cache, "--runs", runs, "--plot", tmp_path / "a-folder",
            names=("Is a directory", str(tmp_path / "a-folder")))
    assert not runs.exists() or not any(runs.iterdir())  # nothing written by a refusal
