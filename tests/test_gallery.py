"""`pipeline score --gallery`: the page's structure, read back with the standard library's HTML parser."""
import base64
import io
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from data.index import SplitIndex, index_path
from data.store import FeatureStore
from evaluate.config import ScoreConfig

METHODS = ["blip-tiny", "clip-tiny", "late-fusion", "hada"]
VOID = {"img", "br", "meta", "link", "input", "hr"}


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], ""

    @property
    def classes(self):
        return (self.attrs.get("class") or "").split()

    def find(self, tag=None, cls=None, **attrs):
        """Descendants matching a tag, a class and attribute values (data_method -> data-method)."""
        out = []
        for c in self.children:
            if (tag is None or c.tag == tag) and (cls is None or cls in c.classes) and all(
                    c.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(c)
            out += c.find(tag, cls, **attrs)
        return out

    def all_text(self):
        return self.text + "".join(c.all_text() for c in self.children)


class Tree(HTMLParser):
    def __init__(self, page):
        super().__init__()
        self.root = self.node = Node("root", {})
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_endtag(self, tag):
        node = self.node
        while node.tag != tag and node.parent is not None:
            node = node.parent
        assert node.tag == tag, f"</{tag}> closes nothing"
        self.node = node.parent

    def handle_data(self, data):
        self.node.text += data


@pytest.fixture(scope="module")
def gallery(demo_run, tmp_path_factory):
    """The page for 5 queries per direction, the score result it was made from, and the split index."""
    from pipeline import _score

    cache, runs, run = demo_run
    path = tmp_path_factory.mktemp("gallery") / "g.html"
    out = run_cli("score", "--dataset", "demo", "--cache", cache, "--runs", runs, "--run", run, "--gallery", path,
                  "--gallery-queries", 5).output
    assert f"gallery: {path}" in out
    result = _score(ScoreConfig(dataset="demo", cache=str(cache), runs=str(runs), run=run))
    return Tree(path.read_text()).root, result, SplitIndex.load(index_path(cache, "demo", "test")), path


def test_each_query_shows_every_method_top5_with_the_ground_truth_marked(gallery):
    page, result, index, _ = gallery
    (t2i,), (i2t,) = page.find("section", id="t2i"), page.find("section", id="i2t")
    assert [th.all_text() for th in t2i.find("th")] == ["caption"] + METHODS
    queries = t2i.find("tr", cls="query")
    assert len(queries) == 5 and len({q.attrs["data-row"] for q in queries}) == 5
    for q in queries:
        caption, truth = int(q.attrs["data-row"]), int(q.attrs["data-truth"])
        assert truth == index.text_to_image[caption] and index.captions[caption] in q.all_text()
        cells = q.find("td", cls="method")
        assert [c.attrs["data-method"] for c in cells] == METHODS
        for cell in cells:
            hits = cell.find("figure", cls="hit")
            assert len(hits) == 5
            assert all(("gt" in h.classes) == (int(h.attrs["data-row"]) == truth) for h in hits)
            rank = result["ranks"][cell.attrs["data-method"]][1][caption]
            assert ("gt" in hits[0].classes) == (rank == 0)  # the page's top-1 is the score's
            assert f"ground truth at rank {rank + 1}" in cell.all_text()

    assert [th.all_text() for th in i2t.find("th")] == ["image"] + METHODS
    queries = i2t.find("tr", cls="query")
    assert len(queries) == 5
    for q in queries:
        image = int(q.attrs["data-row"])
        for cell in q.find("td", cls="method"):
            hits = cell.find("li", cls="hit")
            assert len(hits) == 5
            for h in hits:
                assert ("gt" in h.classes) == (index.text_to_image[int(h.attrs["data-row"])] == image)
                assert h.all_text() == index.captions[int(h.attrs["data-row"])]
            rank = result["ranks"][cell.attrs["data-method"]][0][image]
            assert ("gt" in hits[0].classes) == (rank == 0)


def test_hada_lists_are_the_top5_of_the_cached_fused_embeddings(gallery, demo_run):
    page, _, index, _ = gallery
    fused = FeatureStore(demo_run[1] / "r" / "embeds" / "test")
    images, texts = fused.load("images", tokens=False), fused.load("texts", tokens=False)
    sims = images.embeds @ texts.embeds.T
    for q in page.find("section", id="t2i")[0].find("tr", cls="query"):
        caption = int(q.attrs["data-row"])
        (cell,) = q.find("td", data_method="hada")
        expected = images.ids[np.argsort(-sims[:, caption], kind="stable")[:5]]
        assert [int(h.attrs["data-row"]) for h in cell.find("figure")] == expected.tolist()
    for q in page.find("section", id="i2t")[0].find("tr", cls="query"):
        (cell,) = q.find("td", data_method="hada")
        expected = np.argsort(-sims[int(q.attrs["data-row"])], kind="stable")[:5]
        assert [int(h.attrs["data-row"]) for h in cell.find("li")] == expected.tolist()


def test_counts_of_fixes_and_breaks_are_those_of_the_score_ranks(gallery):
    page, result, _, _ = gallery
    (table,) = page.find("table", id="counts")
    ranks = result["ranks"]
    for method in METHODS[:-1]:
        (row,) = table.find("tr", data_method=method)
        for d, direction in enumerate(("t2i", "i2t")):
            mine, hada = ranks[method][1 - d], ranks["hada"][1 - d]
            cells = [int(c.all_text()) for c in row.find("td")][4 * d:4 * d + 4]
            expected = [((mine > 0) & (hada == 0)).sum(), ((mine == 0) & (hada > 0)).sum(),
                        ((mine == 0) & (hada == 0)).sum(), ((mine > 0) & (hada > 0)).sum()]
            assert cells == expected, (method, direction)
            assert sum(cells) == len(mine)


def test_the_page_is_self_contained(gallery):
    page, _, _, path = gallery
    images = page.find("img")
    assert len(images) == 5 * 4 * 5 + 5 + 5  # top 5 of 4 methods per caption, each caption's truth, each image query
    for img in images:
        src = img.attrs["src"]
        assert src.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert thumb.format == "JPEG" and max(thumb.size) <= 112
    assert not page.find("a") and not page.find("link") and not page.find("script")
    assert path.stat().st_size < 2_000_000


def test_images_not_found_are_named_and_sims_are_refused(demo_run, demo_cache, tmp_path, caplog):
    cache, runs, run = demo_run
    copy = tmp_path / "cache"
    shutil.copytree(cache / "demo", copy / "demo")
    for manifest in (copy / "demo" / "test").glob("*/manifest.json"):  # extraction's folder gone, as if moved
        manifest.write_text(manifest.read_text().replace(str(demo_cache[0]), str(tmp_path / "moved")))
    run_cli("score", "--dataset", "demo", "--cache", copy, "--runs", runs, "--run", run, "--gallery",
            tmp_path / "g.html", "--gallery-queries", 2, "--data-root", tmp_path / "nowhere")
    page = Tree((tmp_path / "g.html").read_text()).root
    assert "the images of demo/test were not found: the gallery shows their names" in caplog.text
    assert not page.find("img") and len(page.find("span", cls="missing")) == 2 * 4 * 5 + 2 + 2

    np.save(tmp_path / "a.npy", np.zeros((60, 300), np.float32))
    out = run_cli("score", "--dataset", "demo", "--cache", cache, "--sims", tmp_path / "a.npy", "--gallery",
                  tmp_path / "g2.html", expect=2).output
    assert "--gallery cannot be combined with --sims" in out
