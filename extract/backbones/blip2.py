"""BLIP-2 retrieval models through transformers' Blip2ForImageTextRetrieval (`blip2`, `blip2-tiny`).

Image nodes are the Q-Former's query outputs (32 x 768 for ViT-g); the global node (row 0) is their
mean, and the stored retrieval embedding is ``vision_projection`` of that mean (= the mean of the
queries' projections). The model itself scores an image against a caption by the best of its queries:
max over q of cos(vision_projection(query_q), text_projection([CLS])); every query's projection is
stored too (the shard's optional ``query_embeds``) so that the backbone-alone score is the model's own.
Caption nodes are the Q-Former's text-only token states ([CLS] first). Image-only and text-only
passes, as the model's ITC path; the ITM head is never used.

`blip2` computes its vision LayerNorms as LAVIS does, whatever the weights' config says: the EVA ViT's blocks with
eps 1e-6 (``create_eva_vit_g``), the norm after it (LAVIS's ``ln_vision``, transformers' ``post_layernorm``) with
torch's default 1e-5.
"""
from __future__ import annotations

import torch
import transformers
from transformers import BertTokenizer, Blip2Config, Blip2ForImageTextRetrieval
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from data.errors import PipelineError
from extract.backbones import register
from extract.backbones.base import Backbone, BackboneOptions, Encoded, Tokenized, named, weights_flag
from extract.backbones.blip import PixelTransform, load_preprocessing, processor_train_view, tiny_vocabulary
from extract.backbones.lavis_vit import LAVIS_VIT_EPS, set_layer_norm_eps
from extract.backbones.text import bert_tokenize
from extract.backbones.weights import hf_snapshot, load_hf_model

# The COCO-finetuned retrieval model; the BLIP-2 paper also reports Flickr30k zero-shot with it.
DEFAULT_CHECKPOINT = "Salesforce/blip2-itm-vit-g-coco"
MAX_TEXT_TOKENS = 35  # LAVIS's BLIP-2 retrieval evaluation truncates captions to 35 tokens
LN_VISION_EPS = 1e-5  # LAVIS's ln_vision after the EVA ViT: torch's default eps


class Blip2(Backbone):
    def __init__(self, name: str, model: Blip2ForImageTextRetrieval, tokenizer, processor, checkpoint: str,
                 flag: str = "--checkpoint", lavis_eps: bool = False):
        self.name, self.module, self.tokenizer, self.processor = name, model.eval(), tokenizer, processor
        self.checkpoint, self.lavis_eps = checkpoint, lavis_eps
        if lavis_eps:
            set_layer_norm_eps(model.vision_model.encoder, LAVIS_VIT_EPS)
            model.vision_model.post_layernorm.eps = LN_VISION_EPS
        vc = model.config.vision_config
        self.image_size = vc.image_size
        self.vision_rows = (vc.image_size // vc.patch_size) ** 2 + 1
        self.num_queries = model.config.num_query_tokens
        self.max_length = min(MAX_TEXT_TOKENS, model.config.qformer_config.max_position_embeddings)
        size = processor.size
        if (size.get("height"), size.get("width")) != (vc.image_size, vc.image_size):
            raise PipelineError(f"{named(flag, checkpoint)}: the image processor resizes to {size}, "
                                f"the model expects {vc.image_size} px")

    def image_rows(self, token_pool: int = 1) -> int:
        return 1 + self.num_queries

    @property
    def queries_per_image(self) -> int:
        return self.num_queries

    def eval_transform(self):
        return PixelTransform(self.processor)

    def train_transform(self):
        # LAVIS's BLIP-2 training augmentation: crop and flip, no RandomAugment.
        return processor_train_view(self.processor, self.image_size, None)

    def tokenize(self, captions: list[str]) -> Tokenized:
        return bert_tokenize(self.tokenizer, captions, self.max_length)

    def encode_images(self, pixels: torch.Tensor) -> Encoded:
        m = self.module
        states = m.vision_model(pixel_values=pixels).last_hidden_state
        if states.shape[1] != self.vision_rows:  # a wrong image size would change the token count
            raise PipelineError(f"{self.name}: got {states.shape[1]} vision tokens, expected {self.vision_rows}")
        mask = torch.ones(states.shape[:-1], dtype=torch.long, device=states.device)
        queries = m.qformer(query_embeds=m.query_tokens.expand(len(states), -1, -1), encoder_hidden_states=states,
                            encoder_attention_mask=mask).last_hidden_state
        queries = queries.to(m.vision_projection.weight.dtype)
        mean = queries.mean(dim=1)
        return Encoded(m.vision_projection(mean), torch.cat([mean[:, None], queries], dim=1),
                       queries=m.vision_projection(queries))

    def encode_texts(self, inputs: dict[str, torch.Tensor]) -> Encoded:
        m = self.module
        states = m.qformer(query_embeds=m.embeddings(input_ids=inputs["input_ids"]), query_length=0,
                           attention_mask=inputs["attention_mask"]).last_hidden_state
        states = states.to(m.text_projection.weight.dtype)
        return Encoded(m.text_projection(states[:, 0]), states, inputs["attention_mask"].sum(1))

    def describe(self) -> dict:
        cfg = self.module.config
        return {
            "backbone": self.name, "model": type(self.module).__name__, "checkpoint": self.checkpoint,
            "image_size": self.image_size, "embed_dim": cfg.image_text_hidden_size,
            "image_token_dim": cfg.qformer_config.hidden_size, "text_token_dim": cfg.qformer_config.hidden_size,
            "query_tokens": self.num_queries,
            "preprocessing": f"BlipImageProcessorPil resize {self.image_size} bicubic, OpenAI mean/std; "
                             f"captions BLIP-cleaned, max {self.max_length} tokens; image nodes: mean of the "
                             f"{self.num_queries} Q-Former queries, then each query",
            "transformers": transformers.__version__, "torch": torch.__version__,
            **({"vision_layer_norm_eps": LAVIS_VIT_EPS, "vision_post_layernorm_eps": LN_VISION_EPS}
               if self.lavis_eps else {}),
        }


@register("blip2", f"BLIP-2 retrieval model (transformers Blip2ForImageTextRetrieval); default weights "
                   f"{DEFAULT_CHECKPOINT}; @<HF id or folder> for others", weights=True)
def blip2(options: BackboneOptions) -> Blip2:
    ref = options.checkpoint or options.weights or DEFAULT_CHECKPOINT
    flag = weights_flag("blip2", options)
    folder = hf_snapshot(ref, flag, options.download)
    model = load_hf_model(Blip2ForImageTextRetrieval, folder, ref, flag)
    return Blip2("blip2", model, *load_preprocessing(folder, ref, flag), ref, flag, lavis_eps=True)


def tiny_blip2_config(vocab_size: int, pad_token_id: int) -> Blip2Config:
    """Blip2ForImageTextRetrieval's architecture in miniature: 64 px, 4 x 4 patches, 8 queries of width 32."""
    return Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16, initializer_range=0.02),
        qformer_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, encoder_hidden_size=32, cross_attention_frequency=1,
                            max_position_embeddings=40, pad_token_id=pad_token_id, use_qformer_text_input=True,
                            initializer_range=0.2),  # at 0.02 the random queries barely depend on the image
        num_query_tokens=8, image_text_hidden_size=16, initializer_range=0.02)


def tiny_blip2(seed: int = 0) -> tuple[Blip2ForImageTextRetrieval, BertTokenizer, BlipImageProcessorPil]:
    """Same classes as `blip2`, tiny random-initialised config (fixed seed), no network."""
    vocab = tiny_vocabulary()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForImageTextRetrieval(tiny_blip2_config(len(vocab), vocab["[PAD]"]))
        # transformers zero-initialises the queries (all 8 would then be one node); LAVIS draws them N(0, 0.02).
        torch.nn.init.normal_(model.query_tokens, std=0.02)
    return model, tokenizer, BlipImageProcessorPil(size={"height": 64, "width": 64})


@register("blip2-tiny", "tiny random-initialised BLIP-2 (same classes) for tests and the demo; no weights")
def blip2_tiny(options: BackboneOptions) -> Blip2:
    model, tokenizer, processor = tiny_blip2()
    return Blip2("blip2-tiny", model, tokenizer, processor, "random-init(seed=0)")
