"""The extraction config: one frozen dataclass, built once from the CLI and written into every shard."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from data.backbone_spec import store_name
from data.datasets import SPLITS
from data.device import PRECISIONS
from data.options import opt
from data.records import ReadOptions
from data.tables import CAPTION_COLUMNS, IMAGE_COLUMNS
from data.webdataset import IMAGE_EXTENSIONS

DEFAULT_SHARD_SIZE = 4096


@dataclass(frozen=True)
class ExtractConfig:
    backbone: str = opt(None, "backbone spec, or several comma-separated: blip[@HF id, folder or .pth], clip, "
                              "blip2[@HF id or folder], albef@<.pth>, "
                              "open_clip:<model>[@tag, file, folder or hf-hub:id], or a tiny test backbone "
                              "(see `pipeline backbones`)", required=True)
    dataset: str | None = opt(None, "dataset folder name under --data-root (default: the only one there), "
                                    "or any name with --annotations")
    split: str | None = opt(None, "one split (default: every split the dataset defines, each into its own store)",
                            choices=SPLITS)
    data_root: str = opt("datasets", "folder holding <dataset>/dataset_<dataset>.json and <dataset>/images/")
    cache: str = opt("cache", "feature cache folder")
    annotations: str | None = opt(None, "an annotation file instead of the data-root layout: Karpathy or LAVIS/ALBEF "
                                        "JSON, or a captions table (.csv, .tsv, .jsonl, .parquet)")
    images: str | None = opt(None, "image folder the --annotations paths are relative to (not needed for absolute "
                                   "paths, nor for a parquet that holds the images)")
    webdataset: str | None = opt(None, "webdataset tar shards as img2dataset writes them ({key}.jpg|png|webp with "
                                       "{key}.txt and/or {key}.json), uncompressed: a path, glob or brace pattern "
                                       "(shards/{00000..00127}.tar)")
    image_column: str | None = opt(None, f"captions table: the image column, paths or image bytes (default: the first "
                                         f"of {', '.join(IMAGE_COLUMNS)} present); --webdataset: the image member's "
                                         f"extension (default: the first of {', '.join(IMAGE_EXTENSIONS)} present)")
    caption_column: str | None = opt(None, f"captions table: the caption column, one caption or a list per row "
                                           f"(default: the first of {', '.join(CAPTION_COLUMNS)} present); "
                                           f"--webdataset: a member extension or a field of {{key}}.json (same "
                                           f"default)")
    holdout: str | None = opt(None, "split a collection that has no split column by a hash of each image's name: "
                                    "VAL,TEST fractions (e.g. 0.05,0.05), the rest is train")
    checkpoint: str | None = opt(None, "where the weights are read from (overrides the spec's @weights; the "
                                       "store keeps the spec's name): HF id or folder (BLIP, BLIP-2), a LAVIS/BLIP "
                                       "retrieval .pth (BLIP), an ALBEF/LAVIS retrieval .pth (ALBEF); tag, file, "
                                       "folder or hf-hub:id (open_clip)")
    processor: str | None = opt(None, "tokenizer (and image processor) for weights that hold none, a .pth: a "
                                      "transformers folder or HF id, looked up locally as weights are (default: "
                                      "the dataset's Salesforce/blip-itm-base-* for blip, bert-base-uncased for "
                                      "albef)")
    model: str | None = opt(None, "open_clip model name for the `clip` store (default ViT-L-14-336-quickgelu); "
                                  "prefer --backbone open_clip:<model>, which gets its own store")
    clip_tokens: bool = opt(False, "store an open_clip ViT's projected patch tokens (CLIP, SigLIP, EVA) as graph "
                                   "nodes, not only its global node")
    download: bool = opt(False, "allow fetching weights from the Hugging Face Hub (default: local files only)")
    batch_size: int = opt(32, "images or captions per forward pass", min=1)
    shard_size: int | None = opt(None, f"images or captions per HDF5 shard (default {DEFAULT_SHARD_SIZE}); a store "
                                       f"keeps the size it was made with: leave it out to continue one", min=1)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    precision: str = opt("fp32", "inference precision", choices=PRECISIONS)
    workers: int = opt(2, "threads decoding and preprocessing images (0: in the thread that runs the shard)", min=0)
    skip_bad: bool = opt(False, "exclude unreadable images (recorded in the manifest) and empty captions (logged) "
                                "instead of stopping")
    scheduler: str = opt("sync", "where shards run: in this process, threads, or a dask.distributed cluster",
                         choices=("sync", "threads", "distributed"))
    address: str | None = opt(None, "dask scheduler address for --scheduler distributed (tcp://host:port)")
    views: int = opt(0, "augmented views stored per training image beside the clean one (train split only; "
                               "at most 127: the store's view index is int8)", min=0, max=127)
    # On extract, not score: the caption set is the split index, which every later stage shares (and the reference
    # bug makes a caption's fused embedding depend on its batch neighbours, so it must be set before encoding).
    captions_per_image: int | None = opt(None, "keep only the first K captions of each image of the scored splits "
                                               "(val, test, all), as the reference evaluates with 5 (COCO's test "
                                               "split: 25,000 of 25,010); "
                                               "train keeps every caption, as the reference trains", min=1)
    token_pool: int = opt(1, "average-pool the patch-token grid by this factor (2: 24x24 -> 12x12)", min=1)
    seed: int = opt(0, "seed of the augmented views", min=0, max=2**31 - 1)
    dry_run: bool = opt(False, "print the plan and the disk space it will take, then stop")

    @property
    def store(self) -> str:
        """The store folder's name, derived from the backbone spec (data/backbone_spec.py)."""
        return store_name(self.backbone)

    @property
    def backbone_list(self) -> list[str]:
        return [b.strip() for b in (self.backbone or "").split(",") if b.strip()]

    def backbone_options(self):
        """What the backbone factory needs from this config."""
        from extract.backbones.base import BackboneOptions  # imported here: the CLI builds this config without torch

        dataset = {"dataset": self.dataset} if self.dataset else {}  # picks BLIP's fine-tuned default weights
        return BackboneOptions(checkpoint=self.checkpoint, model=self.model, tokens=self.clip_tokens,
                               download=self.download, processor=self.processor, **dataset)

    def reading(self) -> ReadOptions:
        """How the dataset reader reads a captions table or webdataset shards."""
        return ReadOptions.from_config(self.to_dict())

    def to_dict(self) -> dict:
        return asdict(self)
