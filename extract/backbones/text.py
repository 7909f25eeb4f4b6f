"""Caption clean-up shared by backbones."""
from __future__ import annotations

import re

_BLIP_PUNCT = re.compile(r"([.!\"()*#:;~])")


def blip_clean(caption: str, max_words: int = 50) -> str:
    """BLIP's caption normalisation: lower-case, some punctuation to spaces, collapse spaces, at most 50 words."""
    text = _BLIP_PUNCT.sub(" ", caption.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])
