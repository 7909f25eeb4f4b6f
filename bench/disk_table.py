"""The README's disk-space table, computed from the shard schema (data.store.sample_bytes) and each model's config.

Node counts and widths come from the architectures' own configs (transformers' BLIP and BLIP-2 defaults, which
are the released base models, and open_clip's model configs); no weights are needed. Captions of BERT-tokenised
backbones are counted at 16 node rows (about 14 word pieces plus [CLS] and [SEP]); open_clip stores one.
Run: python bench/disk_table.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.store import sample_bytes  # noqa: E402
from extract.run import human  # noqa: E402

DATASETS = {"Flickr30k": (31_783, 155_070), "COCO": (123_287, 616_767)}
CAPTION_ROWS = 16


def open_clip_grid(model: str) -> tuple[int, int]:
    """(embedding width, patch grid side) of an open_clip model, from its config (timm trunks built on 'meta')."""
    import open_clip
    import torch

    cfg = open_clip.get_model_config(model)
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision:
        import timm

        with torch.device("meta"):
            patch = timm.create_model(vision["timm_model_name"]).patch_embed.patch_size[0]
    else:
        patch = vision["patch_size"]
    return cfg["embed_dim"], vision["image_size"] // patch


def rows() -> list[str]:
    from transformers import Blip2Config, BlipConfig

    blip, blip2 = BlipConfig(), Blip2Config()
    grid = blip.vision_config.image_size // blip.vision_config.patch_size
    width, proj = blip.vision_config.hidden_size, blip.image_text_hidden_size
    q, qwidth, qproj = blip2.num_query_tokens, blip2.qformer_config.hidden_size, blip2.image_text_hidden_size
    table = [  # (label, bytes per image, bytes per caption)
        (f"`blip` images, {grid * grid + 1} tokens", sample_bytes(grid * grid + 1, width, proj), None),
        (f"`blip` images, `--token-pool 2` ({(grid // 2) ** 2 + 1} tokens)",
         sample_bytes((grid // 2) ** 2 + 1, width, proj), None),
        ("`blip` captions", None, sample_bytes(CAPTION_ROWS, blip.text_config.hidden_size, proj)),
        (f"`blip2` images, {q + 1} query nodes + {q} query embeddings", sample_bytes(q + 1, qwidth, qproj, q), None),
        ("`blip2` captions", None, sample_bytes(CAPTION_ROWS, qwidth, qproj)),
    ]
    clip_dim, _ = open_clip_grid("ViT-L-14-336-quickgelu")
    table.append(("`clip` images + captions (global node)", sample_bytes(1, clip_dim, clip_dim),
                  sample_bytes(1, clip_dim, clip_dim)))
    for model in ("ViT-SO400M-14-SigLIP2-378", "ViT-L-16-SigLIP2-384"):
        dim, side = open_clip_grid(model)
        name = f"`open_clip:{model}@webli`"
        table.append((f"{name} images + captions (global node)", sample_bytes(1, dim, dim), sample_bytes(1, dim, dim)))
        table.append((f"{name} images, `--clip-tokens` ({side * side + 1} tokens)",
                      sample_bytes(side * side + 1, dim, dim), None))
        pooled = -(-side // 2)
        table.append((f"{name} images, `--clip-tokens --token-pool 2` ({pooled * pooled + 1} tokens)",
                      sample_bytes(pooled * pooled + 1, dim, dim), None))
    lines = []
    for label, image, caption in table:
        cells = [human(image) if image else "", f"~{human(caption)}" if caption and not image else
                 (human(caption) if caption else "")]
        for n_img, n_cap in DATASETS.values():
            cells.append(human((image or 0) * n_img + (caption or 0) * n_cap))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    print("| store | per image | per caption | Flickr30k (31,783 img, 155,070 cap) | COCO (123,287 img, 616,767 cap) |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows()))
