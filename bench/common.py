"""Shared bits of the benchmark scripts: machine description, full-size random-init backbones, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_size_backbones():
    """Full-size BLIP ViT-B/16@384 and CLIP ViT-L/14@336 architectures with random weights (no download)."""
    import open_clip
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from extract.backbones.blip import tiny_blip

    _, tokenizer, _ = tiny_blip()  # any BERT tokenizer works for timing; the real one needs the hub
    cfg = BlipConfig(vision_config=dict(image_size=384, initializer_range=0.02),
                     text_config=dict(vocab_size=30524, initializer_range=0.02))
    blip = BlipForImageTextRetrieval(cfg).eval()
    clip = open_clip.create_model("ViT-L-14-336-quickgelu", pretrained=None).eval()
    return blip, tokenizer, clip


def register_full_size() -> None:
    """`blip-full` and `clip-full`: the real architectures, random-initialised, in the backbone registry."""
    import open_clip
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from extract.backbones import register
    from extract.backbones.blip import Blip
    from extract.backbones.clip import Clip

    cache = {}

    def models():
        if not cache:
            cache["m"] = full_size_backbones()
        return cache["m"]

    @register("blip-full", "full-size BLIP architecture, random weights (benchmarks only)")
    def _blip(options):
        blip, tokenizer, _ = models()
        return Blip("blip-full", blip, tokenizer, BlipImageProcessorPil(size={"height": 384, "width": 384}),
                    "random-init(full-size)")

    @register("clip-full", "full-size CLIP ViT-L/14@336 architecture, random weights (benchmarks only)")
    def _clip(options):
        _, _, clip = models()
        preprocess = open_clip.image_transform(336, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                               std=open_clip.OPENAI_DATASET_STD)
        return Clip("clip-full", clip, preprocess, open_clip.get_tokenizer("ViT-L-14-336-quickgelu"),
                    "ViT-L-14-336-quickgelu", "random-init(full-size)", options.tokens)


def write_json(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")
