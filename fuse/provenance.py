"""Whether cached features are the ones a HADA-LAVIS checkpoint was trained on, read from the stores' fingerprints.

The reference (m2man/HADA-LAVIS, Config/*/C1*.yml) fuses LAVIS's ``blip_retrieval`` fine-tuned on the dataset (ViT-B/16
at 384 px: CLS and all 576 patch tokens as nodes) with LAVIS's CLIP ViT-L-14-336 (OpenAI weights: one global node),
computed in fp32, and scores the first 5 captions of each image. A node layout it never produced is refused, naming
the flag that made it; other weights, another precision or other captions are warnings (refusals with ``--strict``),
and an imported run carries them into every score table as "features differ from the reference's: ...".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from data.datasets import dataset_family
from data.errors import PipelineError
from data.store import FeatureStore

LABEL = "features differ from the reference's"
REFERENCE_BLIP = {"flickr30k": "blip_flickr_retrieval.pth", "coco": "blip_coco_retrieval.pth"}  # LAVIS's files
REFERENCE_CLIP = ("ViT-L-14-336-quickgelu", "openai", 336)  # open_clip's name for LAVIS's CLIP, tag, image size
BLIP_EPS = 1e-6
REFERENCE_CAPTIONS = 5


@dataclass(frozen=True)
class StoreFacts:
    """What the check reads about one backbone's store: its name, manifest fingerprint and node rows per image."""

    name: str
    fingerprint: dict
    image_rows: int


def _is_clip(fp: dict) -> bool:
    return "clip_tokens" in fp  # every open_clip store records it


def _is_blip(fp: dict) -> bool:
    return fp.get("model") == "BlipForImageTextRetrieval"


def layout_refusals(stores: list[StoreFacts]) -> list[str]:
    """Node layouts the reference never produced, each naming the flag (or spec) that made it."""
    out = []
    for s in stores:
        fp = s.fingerprint
        if fp.get("token_pool", 1) != 1:
            out.append(f"--token-pool {fp['token_pool']} ({s.name}: {s.image_rows} nodes per image; the reference "
                       f"takes every patch token)")
        if fp.get("clip_tokens"):
            out.append(f"--clip-tokens ({s.name}: {s.image_rows} nodes per image; the reference's CLIP is one "
                       f"global node)")
        if _is_clip(fp) and fp.get("image_size") != REFERENCE_CLIP[2]:
            flag = f"--model {fp.get('model')}" if s.name == "clip" else f"--backbones ...,{s.name}"
            out.append(f"{flag} ({fp.get('image_size')} px; the reference's CLIP is ViT-L-14-336 at 336 px)")
    first = stores[0]
    if first.image_rows <= 1 or "query_tokens" in first.fingerprint:
        out.append(f"--backbones {first.name},...: the first backbone has no patch tokens ({first.image_rows} image "
                   f"nodes); the reference's first is BLIP with CLS and every patch token")
    return out


def _weights_warnings(stores: list[StoreFacts], dataset: str) -> list[str]:
    family = dataset_family(dataset)
    out = [] if family else [f"--dataset {dataset}: the reference has checkpoints for Flickr30k and COCO only"]
    first, second = stores[0], stores[1]
    expected = REFERENCE_BLIP.get(family or "", "LAVIS's blip_retrieval")
    if _is_blip(first.fingerprint):
        checkpoint = str(first.fingerprint.get("checkpoint"))
        if PurePath(checkpoint).name != expected:
            note = (" (transformers' conversion of the BLIP repository's checkpoint: not confirmed to be the same "
                    "weights)" if checkpoint.startswith("Salesforce/blip-itm") else "")
            other = [f for f in REFERENCE_BLIP if f != family and f[:5] in checkpoint.lower()]
            note += f" (fine-tuned on {other[0]}?)" if other else ""
            out.append(f"{first.name} weights {checkpoint}, not LAVIS's {expected}{note}")
        if first.fingerprint.get("vision_layer_norm_eps") != BLIP_EPS:
            out.append(f"{first.name} vision LayerNorm eps from the weights' config, not BLIP's {BLIP_EPS} "
                       f"(extracted before it was set: re-extract)")
    else:
        out.append(f"{first.name} is not the reference's BLIP ({expected})")
    fp = second.fingerprint
    if not _is_clip(fp) or (fp.get("model"), fp.get("checkpoint")) != REFERENCE_CLIP[:2]:
        out.append(f"{second.name} ({fp.get('model')} @ {fp.get('checkpoint')}) is not the reference's CLIP "
                   f"({REFERENCE_CLIP[0]} @ {REFERENCE_CLIP[1]})")
    return out


def warnings(stores: list[StoreFacts], dataset: str, most_captions: int) -> list[str]:
    """Features that differ from the reference's without a layout it never saw: weights, precision, captions."""
    out = _weights_warnings(stores, dataset)
    out += [f"--precision {s.fingerprint['precision']} ({s.name}; the reference computes in fp32)"
            for s in stores if s.fingerprint.get("precision", "fp32") != "fp32"]
    if most_captions > REFERENCE_CAPTIONS:
        out.append(f"up to {most_captions} captions per image; the reference scores the first {REFERENCE_CAPTIONS} "
                   f"(--captions-per-image {REFERENCE_CAPTIONS})")
    return out


def store_facts(name: str, store: FeatureStore) -> StoreFacts:
    """A store's fingerprint (its manifest's) and its node rows per image (the first image's)."""
    offsets = store.load("images", tokens=False).offsets
    return StoreFacts(name, store.manifest()["fingerprint"], int(offsets[1] - offsets[0]))


def check(splits: list[list[StoreFacts]], dataset: str, most_captions: int, strict: bool = False) -> list[str]:
    """The warnings about the backbones' stores of each cached split; a node layout the reference never produced
    is refused, and with ``strict`` so is any warning. ``most_captions``: the most captions an image has."""
    refusals = list(dict.fromkeys(r for stores in splits for r in layout_refusals(stores)))
    if refusals:
        raise PipelineError("the cached features have a node layout the reference never produced: "
                            + "; ".join(refusals))
    found = list(dict.fromkeys(w for stores in splits for w in warnings(stores, dataset, most_captions)))
    if found and strict:
        raise PipelineError(f"--strict: {LABEL}: " + "; ".join(found))
    return found
