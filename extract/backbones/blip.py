"""BLIP retrieval models through transformers' BlipForImageTextRetrieval (`blip`, `blip-tiny`, `blip-demo`).

`blip` takes a transformers folder or Hub id, or a LAVIS/BLIP-repository ``.pth`` (extract/backbones/blip_pth.py), and
computes its vision LayerNorms with eps 1e-6, as BLIP and LAVIS do, whatever the weights' config says.
"""
from __future__ import annotations

import logging

import torch
import transformers
from torchvision import transforms as T
from transformers import AutoTokenizer, BertTokenizer, BlipConfig, BlipForImageTextRetrieval
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from data.datasets import dataset_family
from data.errors import PipelineError
from extract.augment import TrainView
from extract.backbones import register
from extract.backbones.base import Backbone, BackboneOptions, Encoded, Tokenized, named, weights_flag
from extract.backbones.blip_pth import is_pth, load_blip_pth
from extract.backbones.lavis_vit import LAVIS_VIT_EPS, set_layer_norm_eps
from extract.backbones.text import bert_tokenize, check_vocabulary
from extract.backbones.weights import hf_snapshot, load_hf_model

log = logging.getLogger("pipeline.extract")
DEFAULT_CHECKPOINTS = {"flickr30k": "Salesforce/blip-itm-base-flickr", "coco": "Salesforce/blip-itm-base-coco"}
PROCESSOR_FILES = ["*.json", "*.txt"]  # a tokenizer and image processor without the weights


class PixelTransform:
    """PIL -> tensor through BLIP's own PIL image processor (matches the reference's eval transform)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def processor_train_view(processor, image_size: int, magnitude: float | None) -> TrainView:
    """A training view finished by a BLIP-family processor's normalisation (its mean and std, no resize)."""
    return TrainView(image_size, magnitude, T.Compose([T.ToTensor(), T.Normalize(processor.image_mean,
                                                                                   processor.image_std)]))


class TwoTowers(Backbone):
    """BLIP's and ALBEF's retrieval shape: ``module.vision_model`` (a ViT: CLS and a square grid of ``_grid`` patches
    per side), ``module.text_encoder`` (a BERT read in text-only mode), ``vision_proj`` / ``text_proj`` of the first
    token; nodes are every token state."""

    _grid: int

    @property
    def patch_grid(self) -> int:
        return self._grid

    def encode_images(self, pixels: torch.Tensor) -> Encoded:
        # last_hidden_state (after the final ViT norm), CLS first; not pooler_output, which norms twice.
        tokens = self.module.vision_model(pixel_values=pixels).last_hidden_state
        if tokens.shape[1] != self._grid ** 2 + 1:  # a wrong image size passes silently with fewer tokens
            raise PipelineError(f"{self.name}: got {tokens.shape[1]} vision tokens, expected {self._grid ** 2 + 1}")
        return Encoded(self.module.vision_proj(tokens[:, 0]), tokens)

    def encode_texts(self, inputs: dict[str, torch.Tensor]) -> Encoded:
        # Text-only (bidirectional) mode: no encoder states.
        states = self.module.text_encoder(input_ids=inputs["input_ids"],
                                          attention_mask=inputs["attention_mask"]).last_hidden_state
        return Encoded(self.module.text_proj(states[:, 0]), states, inputs["attention_mask"].sum(1))


class Blip(TwoTowers):
    """``vision_eps``: the eps every vision LayerNorm computes with (None: the config's); ``processor_ref``: where the
    tokenizer and image processor came from, when not from the weights' folder."""

    def __init__(self, name: str, model: BlipForImageTextRetrieval, tokenizer, processor, checkpoint: str,
                 vision_eps: float | None = None, processor_ref: str | None = None, flag: str = "--checkpoint"):
        self.name, self.module, self.tokenizer, self.processor = name, model.eval(), tokenizer, processor
        self.checkpoint, self.vision_eps, self.processor_ref = checkpoint, vision_eps, processor_ref
        vc = model.config.vision_config
        if vision_eps is not None:
            set_layer_norm_eps(model.vision_model, vision_eps)
            vc.layer_norm_eps = vision_eps
        self.image_size = vc.image_size
        self._grid = vc.image_size // vc.patch_size
        self.max_length = model.config.text_config.max_position_embeddings
        where = f"--processor {processor_ref}" if processor_ref else named(flag, checkpoint)
        size = processor.size
        if (size.get("height"), size.get("width")) != (vc.image_size, vc.image_size):
            raise PipelineError(f"{where}: the image processor resizes to {size}, the model expects {vc.image_size} px")
        check_vocabulary(tokenizer, model.config.text_config.vocab_size, where)

    def eval_transform(self):
        return PixelTransform(self.processor)

    def train_transform(self):
        # HADA-LAVIS's BLIP training augmentation (LAVIS blip_image_train): magnitude 5.
        return processor_train_view(self.processor, self.image_size, 5)

    def tokenize(self, captions: list[str]) -> Tokenized:
        return bert_tokenize(self.tokenizer, captions, self.max_length)

    def describe(self) -> dict:
        cfg = self.module.config
        return {
            "backbone": self.name, "model": type(self.module).__name__, "checkpoint": self.checkpoint,
            "image_size": self.image_size, "embed_dim": cfg.image_text_hidden_size,
            "image_token_dim": cfg.vision_config.hidden_size, "text_token_dim": cfg.text_config.hidden_size,
            "preprocessing": f"BlipImageProcessorPil resize {self.image_size} bicubic, OpenAI mean/std; "
                             f"captions BLIP-cleaned, max {self.max_length} tokens",
            "transformers": transformers.__version__, "torch": torch.__version__,
            **({"vision_layer_norm_eps": self.vision_eps} if self.vision_eps is not None else {}),
            **({"processor": self.processor_ref} if self.processor_ref else {}),
        }


@register("blip", "BLIP ViT-B/16 retrieval model (transformers BlipForImageTextRetrieval), default weights fine-tuned "
                  "on the dataset (Flickr30k or COCO); @<HF id or folder>, or @<LAVIS/BLIP retrieval .pth> with "
                  "--processor", weights=True, processor=True)
def blip(options: BackboneOptions) -> Blip:
    flag = weights_flag("blip", options)
    ref = options.checkpoint or options.weights or default_weights(options.dataset)
    if is_pth(ref):
        processor = options.processor or default_processor(options.dataset)
        return Blip("blip", load_blip_pth(ref, named(flag, ref)), *processor_parts(processor, options.download), ref,
                    LAVIS_VIT_EPS, processor, flag)
    return load_blip("blip", ref, options.download, flag, LAVIS_VIT_EPS, options.processor)


def default_weights(dataset: str) -> str:
    """The dataset's fine-tuned BLIP, said in one line (a warning when the dataset is neither Flickr30k nor COCO)."""
    family = dataset_family(dataset)
    ref = DEFAULT_CHECKPOINTS[family or "coco"]
    if family:
        log.info("blip: weights %s, fine-tuned on %s (--dataset %s); name others with blip@<HF id, folder or .pth>",
                 ref, family, dataset)
    else:
        log.warning("blip: --dataset %s is neither Flickr30k nor COCO by name, so its default weights are the "
                    "COCO-finetuned %s; name the weights with blip@<HF id, folder or .pth> to choose", dataset, ref)
    return ref


def default_processor(dataset: str) -> str:
    """Where a .pth's tokenizer and image processor come from without --processor: the dataset's BLIP on the Hub."""
    return DEFAULT_CHECKPOINTS[dataset_family(dataset) or "coco"]


def load_blip(name: str, ref: str, download: bool, flag: str, vision_eps: float | None = None,
              processor: str | None = None) -> Blip:
    """A BLIP retrieval model, its tokenizer and image processor (from ``processor`` if named) from an HF id or
    folder, checked completely."""
    folder = hf_snapshot(ref, flag, download)
    model = load_hf_model(BlipForImageTextRetrieval, folder, ref, flag)
    parts = processor_parts(processor, download) if processor else load_preprocessing(folder, ref, flag)
    return Blip(name, model, *parts, ref, vision_eps, processor, flag)


def processor_parts(ref: str, download: bool) -> tuple:
    """(tokenizer, PIL image processor) of a BLIP folder or Hub id named by --processor (its weights not needed)."""
    folder = hf_snapshot(ref, "--processor", download, PROCESSOR_FILES, what="tokenizer and image processor")
    return load_preprocessing(folder, ref, "--processor")


def load_preprocessing(folder: str, ref: str, flag: str) -> tuple:
    """(tokenizer, PIL image processor) saved beside a BLIP or BLIP-2 model."""
    try:
        return AutoTokenizer.from_pretrained(folder), BlipImageProcessorPil.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{named(flag, ref)}: no tokenizer or image processor in {folder} ({e})") from None


def tiny_vocabulary() -> dict[str, int]:
    """A small BERT WordPiece vocabulary built in code: specials, the demo words, letters and suffix letters."""
    from data.demo import DEMO_WORDS

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    words += [w for w in DEMO_WORDS if w not in words] + [c for c in letters if c not in DEMO_WORDS]
    words += ["##" + c for c in letters]
    return {w: i for i, w in enumerate(words)}


def tiny_blip(seed: int = 0) -> tuple[BlipForImageTextRetrieval, BertTokenizer, BlipImageProcessorPil]:
    """Same classes as `blip`, tiny random-initialised config (fixed seed), no network."""
    vocab = tiny_vocabulary()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           # the default initializer_range, 1e-10, makes the outputs ignore the image
                           image_size=64, patch_size=16, initializer_range=0.02),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, pad_token_id=vocab["[PAD]"],
                         bos_token_id=vocab["[CLS]"], sep_token_id=vocab["[SEP]"], initializer_range=0.02),
        image_text_hidden_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForImageTextRetrieval(config)
    return model, tokenizer, BlipImageProcessorPil(size={"height": 64, "width": 64})


@register("blip-tiny", "tiny random-initialised BLIP (same classes) for tests and the demo; no weights")
def blip_tiny(options: BackboneOptions) -> Blip:
    return random_tiny_blip("blip-tiny")


def random_tiny_blip(name: str) -> Blip:
    """The tiny BLIP, random-initialised (seed 0), as the backbone ``name``."""
    return Blip(name, *tiny_blip(), "random-init(seed=0)")


@register("blip-demo", "the demo's BLIP: the blip-tiny architecture with weights `pipeline demo` trains (colours "
                       "view), required: @<folder> or --checkpoint <folder>", weights=True, needs_weights=True)
def blip_demo(options: BackboneOptions) -> Blip:
    from extract.backbones.demo_training import missing_demo_weights

    ref = options.checkpoint or options.weights
    if not ref:
        raise missing_demo_weights("blip-demo")
    return load_blip("blip-demo", ref, options.download, weights_flag("blip-demo", options))
