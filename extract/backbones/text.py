"""Caption clean-up and BERT tokenisation shared by backbones: BLIP's (also BLIP-2's) and ALBEF's."""
from __future__ import annotations

import re

from data.errors import PipelineError

_BLIP_PUNCT = re.compile(r"([.!\"()*#:;~])")
_ALBEF_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")


def _words(text: str, max_words: int) -> str:
    """Spaces collapsed, the ends trimmed, at most ``max_words`` words (both code bases' tail of pre_caption)."""
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def blip_clean(caption: str, max_words: int = 50) -> str:
    """BLIP's caption normalisation: lower-case, some punctuation to spaces, collapse spaces, at most 50 words."""
    return _words(_BLIP_PUNCT.sub(" ", caption.lower()), max_words)


def albef_clean(caption: str, max_words: int = 30) -> str:
    """ALBEF's (dataset/utils.py pre_caption): lower-case, punctuation ``,.'!?"()*#:;~`` removed, ``-`` and ``/`` to
    spaces, ``<person>`` to ``person``, collapse spaces, at most 30 words."""
    text = _ALBEF_PUNCT.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    return _words(text, max_words)


def check_vocabulary(tokenizer, rows: int, where: str) -> None:
    """Refuse a tokenizer with more tokens than the model has text embeddings (``where`` names its source)."""
    if len(tokenizer) > rows:
        raise PipelineError(f"{where}: the tokenizer has {len(tokenizer)} tokens, the model's text embeddings {rows}")


def _packed(ids: list[list[int]], pad_id: int, truncated: int):
    """Token ids padded into a batch with its attention mask, as Tokenized."""
    import torch

    from extract.backbones.base import Tokenized

    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return Tokenized({"input_ids": input_ids, "attention_mask": mask}, truncated, mask.sum(1))


def bert_tokenize(tokenizer, captions: list[str], max_length: int):
    """BLIP-cleaned captions through a BERT tokenizer, cut to ``max_length`` tokens ([SEP] kept) and counted."""
    ids = tokenizer([blip_clean(c) for c in captions], truncation=False)["input_ids"]
    truncated = sum(len(x) > max_length for x in ids)
    sep = tokenizer.sep_token_id
    ids = [x if len(x) <= max_length else x[: max_length - 1] + [sep] for x in ids]
    return _packed(ids, tokenizer.pad_token_id, truncated)


def albef_tokenize(tokenizer, captions: list[str], max_length: int):
    """ALBEF-cleaned captions as ALBEF's own BERT tokenizer writes them: [CLS] then the word pieces, no [SEP]
    (its ``build_inputs_with_special_tokens``), cut to ``max_length`` tokens and counted."""
    ids = tokenizer([albef_clean(c) for c in captions], add_special_tokens=False)["input_ids"]
    truncated = sum(len(x) + 1 > max_length for x in ids)
    return _packed([[tokenizer.cls_token_id] + x[: max_length - 1] for x in ids], tokenizer.pad_token_id, truncated)
