"""Caption clean-up shared by backbones."""
from __future__ import annotations

import re

_BLIP_PUNCT = re.compile(r"([.!\"()*#:;~])")


def blip_clean(caption: str, max_words: int = 50) -> str:
    """BLIP's caption normalisation: lower-case, some punctuation to spaces, collapse spaces, at most 50 words."""
    text = _BLIP_PUNCT.sub(" ", caption.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def bert_tokenize(tokenizer, captions: list[str], max_length: int):
    """BLIP-cleaned captions through a BERT tokenizer, cut to ``max_length`` tokens ([SEP] kept) and counted."""
    import torch

    from extract.backbones.base import Tokenized

    ids = tokenizer([blip_clean(c) for c in captions], truncation=False)["input_ids"]
    truncated = sum(len(x) > max_length for x in ids)
    sep = tokenizer.sep_token_id
    ids = [x if len(x) <= max_length else x[: max_length - 1] + [sep] for x in ids]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return Tokenized({"input_ids": input_ids, "attention_mask": mask}, truncated, mask.sum(1))
