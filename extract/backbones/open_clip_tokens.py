"""Patch tokens of open_clip image towers, brought to the embedding width so that all image nodes share it.

Two kinds of tower expose them: open_clip's own VisionTransformer (``output_tokens``: states after
``ln_post``, then ``proj``) and timm ViT trunks (SigLIP, SigLIP 2, EVA: ``forward_features`` after the
final norm, prefix tokens dropped, then the same per-token head the pooled feature goes through).
Convolutional towers (ResNet, ConvNeXt) have none.
"""
from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer

from data.errors import PipelineError


def _timm_trunk(visual):
    trunk = getattr(visual, "trunk", None)
    ok = trunk is not None and hasattr(trunk, "forward_features") and hasattr(trunk, "num_prefix_tokens") \
        and hasattr(getattr(trunk, "patch_embed", None), "grid_size")
    return trunk if ok else None


def check_patch_tokens(visual, model_name: str) -> None:
    """Refuse --clip-tokens for a tower without patch tokens, before any work."""
    if not isinstance(visual, VisionTransformer) and _timm_trunk(visual) is None:
        raise PipelineError(f"--clip-tokens: the image tower of {model_name} ({type(visual).__name__}"
                            f"{'/' + type(visual.trunk).__name__ if hasattr(visual, 'trunk') else ''}) has no patch "
                            f"tokens; leave --clip-tokens off to store its global node only")


def patch_grid(visual) -> int:
    """Side of the square patch grid (timm: from the tower's image size, which may differ from the trunk's default)."""
    if isinstance(visual, VisionTransformer):
        return int(visual.grid_size[0])
    return int(visual.image_size[0]) // int(_timm_trunk(visual).patch_embed.patch_size[0])


def pooled_and_patches(visual, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x D image embeddings exactly as encode_image gives them, B x N x D patch tokens)."""
    if isinstance(visual, VisionTransformer):
        # VisionTransformer.forward's steps, keeping its patch states (after ln_post, unprojected): the same
        # numbers as `output_tokens = True`, without switching that flag on a module other threads may be using.
        pooled, patches = visual._pool(visual.transformer(visual._embeds(pixels)))
        if visual.proj is not None:
            pooled, patches = pooled @ visual.proj, patches @ visual.proj
        return pooled, patches
    trunk = _timm_trunk(visual)
    states = trunk.forward_features(pixels)
    pooled = visual.head(trunk.forward_head(states))
    patches = per_token_head(visual, states)[:, trunk.num_prefix_tokens:]
    if patches.shape[-1] != pooled.shape[-1]:
        raise PipelineError(f"--clip-tokens: patch tokens of width {patches.shape[-1]} cannot be brought to the "
                            f"embedding width {pooled.shape[-1]} for this tower; leave --clip-tokens off")
    return pooled, patches


def per_token_head(visual, states: torch.Tensor) -> torch.Tensor:
    """A timm tower's token states through what follows pooling (fc_norm, the trunk's head, open_clip's head)."""
    trunk = visual.trunk
    fc_norm = getattr(trunk, "fc_norm", None)
    return visual.head(trunk.get_classifier()(fc_norm(states) if fc_norm is not None else states))
