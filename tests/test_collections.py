"""Collection readers (captions tables, parquet, webdataset shards): the same split index and features as the
Karpathy reader on the same images; bad rows refused or skipped by name; splits by column or by hash."""
import csv
import io
import json
import pickle
import tarfile
import time

import numpy as np
import pytest

from conftest import run_cli, write_karpathy
from data.datasets import load_splits, resolve
from data.errors import PipelineError
from data.records import ReadOptions, holdout_split
from data.store import FeatureStore
from data.webdataset import expand_braces, shard_paths


def karpathy_rows(root):
    """(name, captions, split) of every image of root/toy's Karpathy file, in file order."""
    obj = json.loads((root / "toy" / "dataset_toy.json").read_text())
    return [(e["filename"], [s["raw"] for s in e["sentences"]], e["split"]) for e in obj["images"]]


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["filepath", "title", "split"])
        for name, caps, split in rows:  # one row per caption: several rows per image
            for c in caps:
                w.writerow([name, c, split])


def write_tar(path, samples, members=("jpg", "txt", "json")):
    """A shard as img2dataset writes it: {key}.jpg, {key}.txt (the caption), {key}.json (its metadata)."""
    with tarfile.open(path, "w|") as tar:
        for key, files in samples:
            for ext in members:
                if ext in files:
                    data = files[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, time.time(), \
                        "bigdata", "bigdata"
                    tar.addfile(info, io.BytesIO(data))


def tar_samples(root, rows):
    for name, caps, split in rows:
        key = name.rsplit(".", 1)[0]
        meta = {"url": f"http://x/{name}", "key": key, "status": "success", "caption": caps[0], "captions": caps,
                "split": split, "width": 48, "height": 48}
        yield key, {"jpg": (root / "toy" / "images" / name).read_bytes(), "txt": caps[0].encode(),
                    "json": json.dumps(meta).encode()}


def write_parquet(path, root, rows, style, row_group_size=5):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [(root / "toy" / "images" / name).read_bytes() for name, _, _ in rows]
    columns = {"caption": [caps for _, caps, _ in rows], "split": [s for _, _, s in rows]}
    if style == "hf":  # Hugging Face datasets' Image feature
        columns["image"] = [{"bytes": b, "path": name} for b, (name, _, _) in zip(images, rows)]
    elif style == "img2dataset":
        columns["jpg"] = images
        columns["key"] = [name.rsplit(".", 1)[0] for name, _, _ in rows]
    else:
        columns["image"] = [name for name, _, _ in rows]
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    """The toy Karpathy dataset (24 images, 5-7 captions) and the same images and captions in every format."""
    base = tmp_path_factory.mktemp("collections")
    root = base / "datasets"
    write_karpathy(root, "toy", {"train": 10, "val": 6, "test": 8})
    rows = karpathy_rows(root)
    write_csv(base / "toy.csv", rows)
    write_csv(base / "toy.tsv", rows, "\t")
    with open(base / "toy.jsonl", "w") as f:
        for name, caps, split in rows:
            f.write(json.dumps({"image": name, "caption": caps, "split": split}) + "\n\n")
    for style in ("hf", "img2dataset", "paths"):
        write_parquet(base / f"{style}.parquet", root, rows, style)
    (base / "shards").mkdir()
    samples = list(tar_samples(root, rows))
    write_tar(base / "shards" / "00000.tar", samples[:15])
    write_tar(base / "shards" / "00001.tar", samples[15:])
    return base, root, rows


def spec_of(base, root, fmt, **options):
    images = root / "toy" / "images"
    if fmt == "karpathy":
        return resolve("toy", root)
    if fmt == "webdataset":
        return resolve("toy", webdataset=str(base / "shards" / "{00000..00001}.tar"), options=ReadOptions(**options))
    path = base / fmt
    needs_images = fmt.endswith((".csv", ".tsv", ".jsonl")) or fmt == "paths.parquet"
    return resolve("toy", annotations=path, images=images if needs_images else None, options=ReadOptions(**options))


FORMATS = {"toy.csv": {"caption_column": "title"}, "toy.tsv": {"caption_column": "title"}, "toy.jsonl": {},
           "hf.parquet": {}, "paths.parquet": {}, "webdataset": {"caption_column": "captions"}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_karpathy_split_index(collections, fmt):
    base, root, _ = collections
    expected = load_splits(spec_of(base, root, "karpathy"))
    got = load_splits(spec_of(base, root, fmt, **FORMATS[fmt]))
    assert list(got) == ["train", "val", "test"]
    for split, index in got.items():
        assert index.images == expected[split].images and index.captions == expected[split].captions
        assert index.version == expected[split].version  # pairing too
        first = index.source.refs(index, [0])[0]
        data = first.read_bytes() if hasattr(first, "read_bytes") else first.read()
        assert data == (root / "toy" / "images" / index.images[0]).read_bytes()


def test_img2dataset_parquet_and_default_webdataset_captions(collections):
    base, root, rows = collections
    expected = load_splits(spec_of(base, root, "karpathy"))["test"]
    index = load_splits(spec_of(base, root, "img2dataset.parquet"), ["test"])["test"]
    assert index.images == tuple(n.rsplit(".", 1)[0] for n in expected.images)  # named by the key column
    assert index.captions == expected.captions
    # img2dataset's own caption field (one string per image) by default; the caption list asked for by name above
    test = [r for r in rows if r[2] == "test"]
    index = load_splits(spec_of(base, root, "webdataset"), ["test"])["test"]
    assert index.captions == tuple(caps[0] for _, caps, _ in test)
    txt = load_splits(spec_of(base, root, "webdataset", caption_column="txt"), ["test"])["test"]
    assert txt.captions == index.captions


def test_image_sources_survive_pickling_with_absolute_paths(collections, monkeypatch):
    base, root, _ = collections
    for fmt in ("webdataset", "hf.parquet"):
        index = load_splits(spec_of(base, root, fmt, **FORMATS[fmt]), ["train"])["train"]
        remote = pickle.loads(pickle.dumps(index.source.resolve()))
        monkeypatch.chdir(base.parent)  # a dask worker elsewhere reads the same bytes
        rows = [0, 4, 9]  # row groups of 5 rows: three groups
        assert [r.read() for r in remote.refs(index, rows)] == \
            [(root / "toy" / "images" / index.images[r]).read_bytes() for r in rows]


EXTRACT = ("--backbone", "clip-tiny", "--split", "test", "--workers", 1, "--batch-size", 4, "--shard-size", 5)


@pytest.fixture(scope="module")
def karpathy_cache(collections, tmp_path_factory):
    """The toy test split extracted from its Karpathy file."""
    cache = tmp_path_factory.mktemp("karpathy") / "cache"
    run_cli("extract", "--dataset", "toy", "--data-root", collections[1], "--cache", cache, *EXTRACT)
    return cache


@pytest.mark.parametrize("fmt", ["toy.csv", "hf.parquet", "webdataset"])
def test_each_format_extracts_the_karpathy_features(collections, karpathy_cache, tmp_path, fmt):
    base, root, _ = collections
    if fmt == "webdataset":
        source = ("--webdataset", base / "shards" / "0000[01].tar", "--caption-column", "captions")
    elif fmt == "toy.csv":
        source = ("--annotations", base / fmt, "--images", root / "toy" / "images", "--caption-column", "title")
    else:
        source = ("--annotations", base / fmt)
    out = run_cli("extract", "--dataset", "mine", "--cache", tmp_path / "c", *source, *EXTRACT).output
    assert "8 image rows" in out and "0 bad images" in out
    for kind in ("images", "texts"):
        want = FeatureStore.at(karpathy_cache, "toy", "test", "clip-tiny").load(kind)
        got = FeatureStore.at(tmp_path / "c", "mine", "test", "clip-tiny").load(kind)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.embeds, want.embeds)
        np.testing.assert_array_equal(got.tokens, want.tokens)
    assert (tmp_path / "c" / "mine" / "test" / "index.json").read_text() == \
        (karpathy_cache / "toy" / "test" / "index.json").read_text().replace('"toy"', '"mine"')
    again = run_cli("extract", "--dataset", "mine", "--cache", tmp_path / "c", *source, *EXTRACT).output
    assert "(0 written now)" in again  # resumable: the same index, every shard kept


def bad_shard(base, root, rows):
    """A shard with one sample without an image and one whose image bytes are not an image."""
    samples = list(tar_samples(root, rows[16:20]))
    del samples[1][1]["jpg"]
    samples[2][1]["jpg"] = b"not a jpeg"
    path = base / "bad.tar"
    write_tar(path, samples)
    return path


def test_bad_tar_samples_are_refused_or_skipped_by_name(collections, tmp_path):
    base, root, rows = collections
    path = bad_shard(tmp_path, root, rows)
    args = ("extract", "--dataset", "bad", "--webdataset", path, "--backbone", "clip-tiny", "--split", "test",
            "--cache", tmp_path / "c", "--workers", 0)
    out = run_cli(*args, expect=2).output
    assert f"{path}:img_0017: FileNotFoundError: the sample has no image member" in out
    assert f"{path}:img_0018.jpg: UnidentifiedImageError: cannot identify image file '{path}:img_0018.jpg'" in out
    assert "--skip-bad" in out
    out = run_cli(*args, "--skip-bad").output
    assert "2 image rows" in out and "2 bad images" in out
    store = FeatureStore.at(tmp_path / "c", "bad", "test", "clip-tiny")
    assert store.bad_images() == [1, 2] and store.load("images").ids.tolist() == [0, 3]


def test_bad_parquet_cells_are_refused_or_skipped_by_name(collections, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, root, rows = collections
    good = (root / "toy" / "images" / rows[0][0]).read_bytes()
    table = pa.table({"jpg": [good, None, b"\x89PNG broken", good[:300]], "caption": ["a", "b", "c", "d"]})
    pq.write_table(table, tmp_path / "bad.parquet")
    args = ("extract", "--dataset", "bad", "--annotations", tmp_path / "bad.parquet", "--backbone", "clip-tiny",
            "--split", "all", "--cache", tmp_path / "c", "--workers", 0)
    out = run_cli(*args, expect=2).output
    for row in (1, 2, 3):
        assert f"bad.parquet:jpg[{row}] ({row:09d})" in out, out
    out = run_cli(*args, "--skip-bad").output
    assert "1 image rows" in out and "3 bad images" in out


def test_empty_captions_and_rows_without_image_are_refused_or_skipped_by_name(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,one\nb.jpg,\nc.jpg,three\n,orphan\nb.jpg,  \n")
    spec = resolve("x", annotations=tmp_path / "c.csv", images=images)
    with pytest.raises(PipelineError, match=r"line 5 of .*c\.csv: no image in column 'image' \(pass --skip-bad"):
        load_splits(spec, ["all"])
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,one\nb.jpg,\nc.jpg,three\nb.jpg,  \n")
    with pytest.raises(PipelineError, match=r"line 3 of .*c\.csv: caption 0 of image 'b\.jpg' is empty"):
        load_splits(spec, ["all"])
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,one\nb.jpg,\nc.jpg,three\n,orphan\nb.jpg,  \n")
    skipping = resolve("x", annotations=tmp_path / "c.csv", images=images, options=ReadOptions(skip_bad=True))
    index = load_splits(skipping, ["all"])["all"]
    assert index.images == ("a.jpg", "c.jpg") and index.captions == ("one", "three")
    logged = caplog.text
    assert "3 bad rows skipped" in logged and "line 5 of" in logged and "caption 1 of image 'b.jpg'" in logged


def test_karpathy_empty_captions_follow_skip_bad_too(tmp_path):
    (tmp_path / "coco").mkdir()
    entries = [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}, {"raw": " "}]},
               {"filename": "b.jpg", "split": "test", "sentences": [{"raw": ""}]}]
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    with pytest.raises(PipelineError, match="caption 1 of image 'a.jpg' is empty"):
        load_splits(resolve("coco", tmp_path), ["test"])
    index = load_splits(resolve("coco", tmp_path, options=ReadOptions(skip_bad=True)), ["test"])["test"]
    assert index.images == ("a.jpg",) and index.captions == ("x",)


def test_splits_without_a_split_column(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = ["image\tcaption"] + [f"img{i}.jpg\tcaption {i}" for i in range(400)] + ['img0.jpg\t"a quote\ttab']
    (tmp_path / "c.tsv").write_text("\n".join(lines) + "\n")

    def splits(holdout=None, wanted=None):
        spec = resolve("x", annotations=tmp_path / "c.tsv", images=images, options=ReadOptions(holdout=holdout))
        return load_splits(spec, wanted)

    with pytest.raises(PipelineError, match="has no split column: pass --split all .* or --holdout VAL,TEST"):
        splits()
    whole = splits(wanted=["all"])["all"]
    assert len(whole.images) == 400 and whole.captions[:2] == ("caption 0", '"a quote')  # unquoted TSV
    assert len(splits(wanted=["test"])["test"].images) == 400  # taken whole as the split named, like a LAVIS file
    held = splits((0.1, 0.2))
    assert list(held) == ["train", "val", "test"]
    sizes = {s: len(i.images) for s, i in held.items()}
    assert sum(sizes.values()) == 400 and 20 <= sizes["val"] <= 60 and 50 <= sizes["test"] <= 110
    assert held["val"].images == splits((0.1, 0.2), ["val"])["val"].images  # deterministic
    assert all(holdout_split(n, (0.1, 0.2)) == "val" for n in held["val"].images)
    assert len(splits((0.1, 0.2), ["all"])["all"].images) == 400


@pytest.mark.parametrize("text,message", [("0.1", "give the val and test fractions"),
                                          ("0.5,0.6", "leave some images for train"), ("a,b", "fractions")])
def test_malformed_holdout_is_refused(tmp_path, text, message):
    from conftest import run_cli as cli

    (tmp_path / "c.csv").write_text("image,caption\n/a.jpg,x\n")
    out = cli("extract", "--backbone", "clip-tiny", "--dataset", "x", "--annotations", tmp_path / "c.csv",
              "--holdout", text, "--cache", tmp_path / "c", expect=2).output
    assert f"--holdout {text!r}" in out and message in out


def test_split_column_values_and_conflicts(tmp_path):
    (tmp_path / "i").mkdir()
    ann = tmp_path / "c.jsonl"

    def load(text, **options):
        ann.write_text(text)
        return load_splits(resolve("x", annotations=ann, images=tmp_path / "i", options=ReadOptions(**options)))

    index = load('{"image": "a.jpg", "text": "x", "split": "validation"}\n'
                 '{"image": "b.jpg", "text": "y", "split": "restval"}\n')
    assert index["val"].images == ("a.jpg",) and index["train"].images == ("b.jpg",)
    with pytest.raises(PipelineError, match="line 1 of .*: split 'dev' of image 'a.jpg' is none of"):
        load('{"image": "a.jpg", "text": "x", "split": "dev"}\n')
    with pytest.raises(PipelineError, match="image 'a.jpg' is in split train .* and in test"):
        load('{"image": "a.jpg", "text": "x", "split": "train"}\n{"image": "a.jpg", "text": "y", "split": "test"}\n')
    with pytest.raises(PipelineError, match="--holdout: .* has its own split column"):
        load('{"image": "a.jpg", "text": "x", "split": "train"}\n', holdout=(0.1, 0.1))
    with pytest.raises(PipelineError, match=r"line 2 of .*: not valid JSON"):
        load('{"image": "a.jpg", "text": "x"}\n{"image": \n')


def test_columns_are_named_or_found_and_misnamed_ones_refused(tmp_path):
    (tmp_path / "c.csv").write_text("file_name,sentence,other\n/x/a.jpg,hello,1\n")
    index = load_splits(resolve("x", annotations=tmp_path / "c.csv"), ["all"])["all"]
    assert index.images == ("/x/a.jpg",) and index.captions == ("hello",)  # absolute paths need no --images
    with pytest.raises(PipelineError, match=r"no column 'title' \(--caption-column\); its columns: file_name, "
                                            r"sentence, other"):
        load_splits(resolve("x", annotations=tmp_path / "c.csv", options=ReadOptions(caption_column="title")))
    (tmp_path / "d.csv").write_text("url,caption\nhttp://a,b\n")
    with pytest.raises(PipelineError, match="none of the columns image, filepath, file_name, path, jpg: name yours "
                                            "with --image-column"):
        load_splits(resolve("x", annotations=tmp_path / "d.csv"), ["all"])
    (tmp_path / "e.csv").write_text("image,caption\na.jpg,b\n")
    with pytest.raises(PipelineError, match="image path 'a.jpg' is relative: pass --images DIR"):
        load_splits(resolve("x", annotations=tmp_path / "e.csv"), ["all"])
    with pytest.raises(PipelineError, match="--holdout: for captions tables"):
        resolve("toy", tmp_path, options=ReadOptions(holdout=(0.1, 0.1)))


def test_shard_patterns():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    with pytest.raises(PipelineError, match="neither a range"):
        expand_braces("x{y}")


def test_shard_patterns_name_missing_files(collections):
    base, _, _ = collections
    assert shard_paths(str(base / "shards" / "*.tar")) == [base / "shards" / "00000.tar", base / "shards" /
                                                           "00001.tar"]
    with pytest.raises(PipelineError, match=r"no such file .*00002\.tar"):
        shard_paths(str(base / "shards" / "{00000..00002}.tar"))
    with pytest.raises(PipelineError, match="nothing matches"):
        shard_paths(str(base / "nowhere" / "*.tar"))


def test_compressed_duplicate_and_misnamed_shards_are_refused(collections, tmp_path):
    import gzip

    base, root, rows = collections
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((base / "shards" / "00000.tar").read_bytes()))
    with pytest.raises(PipelineError, match="gzip-compressed tar; .* decompress it first"):
        load_splits(resolve("x", webdataset=str(tmp_path / "a.tar.gz")), ["all"])
    (tmp_path / "copy.tar").write_bytes((base / "shards" / "00000.tar").read_bytes())
    with pytest.raises(PipelineError, match=r"copy\.tar: sample 'img_0000' repeats one of .*00000\.tar"):
        load_splits(resolve("x", webdataset=f"{{{base / 'shards' / '00000.tar'},{tmp_path / 'copy.tar'}}}"), ["all"])
    with pytest.raises(PipelineError, match=r"no sample has an image member \(\.png\).*--image-column"):
        load_splits(resolve("x", webdataset=str(base / "shards" / "00000.tar"),
                            options=ReadOptions(image_column="png")), ["all"])
    with pytest.raises(PipelineError, match="no sample has a caption .*its members and fields: .*captions"):
        load_splits(resolve("x", webdataset=str(base / "shards" / "00000.tar"),
                            options=ReadOptions(caption_column="title")), ["all"])


def test_long_member_names_and_subfolders_are_read_at_their_offsets(collections, tmp_path):
    base, root, rows = collections
    key = "deep/" + "k" * 150  # a pax header before the member: its offset must still be right
    data = (root / "toy" / "images" / rows[3][0]).read_bytes()
    write_tar(tmp_path / "long.tar", [(key, {"png": data, "txt": b"a caption"})], members=("png", "txt"))
    index = load_splits(resolve("x", webdataset=str(tmp_path / "long.tar")), ["all"])["all"]
    assert index.images == (f"{key}.png",) and index.captions == ("a caption",)
    assert index.source.refs(index, [0])[0].read() == data


def test_parquet_bytes_extract_on_a_dask_cluster_like_in_process(collections, karpathy_cache, tmp_path):
    """Shard jobs sent to a dask.distributed worker read their rows' bytes from the parquet's row groups."""
    from distributed import LocalCluster

    base, _, _ = collections
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        run_cli("extract", "--dataset", "mine", "--cache", tmp_path / "c", "--annotations", base / "hf.parquet",
                *EXTRACT, "--scheduler", "distributed", "--address", cluster.scheduler_address)
    want = FeatureStore.at(karpathy_cache, "toy", "test", "clip-tiny").load("images")
    got = FeatureStore.at(tmp_path / "c", "mine", "test", "clip-tiny").load("images")
    np.testing.assert_array_equal(got.embeds, want.embeds)


def test_collection_flags_are_refused_where_they_do_not_apply(collections, tmp_path):
    base, root, _ = collections
    shards = base / "shards" / "*.tar"
    common = ("extract", "--backbone", "clip-tiny", "--cache", tmp_path / "c")
    out = run_cli(*common, "--webdataset", shards, expect=2).output
    assert "--webdataset needs --dataset NAME" in out
    out = run_cli(*common, "--dataset", "x", "--webdataset", shards, "--annotations", base / "toy.csv",
                  expect=2).output
    assert "--webdataset reads tar shards that hold their images and captions" in out
    out = run_cli(*common, "--dataset", "toy", "--data-root", root, "--image-column", "jpg", "--holdout", "0.1,0.1",
                  expect=2).output
    assert "--image-column, --holdout: for captions tables" in out and "a Karpathy split file" in out


@pytest.mark.parametrize("fmt", ["hf.parquet", "webdataset"])
def test_the_gallery_shows_images_held_in_shards_and_parquet(collections, tmp_path, fmt):
    """The gallery reads thumbnails where extraction read the images: tar members and parquet cells too."""
    base, _, _ = collections
    source = ("--webdataset", base / "shards" / "0000[01].tar", "--caption-column", "captions") \
        if fmt == "webdataset" else ("--annotations", base / fmt)
    run_cli("extract", "--dataset", "mine", "--cache", tmp_path / "c", *source, *EXTRACT)
    page = tmp_path / "g.html"
    run_cli("score", "--dataset", "mine", "--cache", tmp_path / "c", "--runs", tmp_path / "runs", "--gallery", page,
            "--gallery-queries", 3)
    html_text = page.read_text()
    assert html_text.count('src="data:image/jpeg;base64,') > 0 and "(not found)" not in html_text
