"""Pool ViT token sequences into one feature vector per image, as the MAE-CT evaluations do.

``'cls'`` takes the CLS token (token 0). ``'mean_patch'`` averages the patch tokens, that is every token after the
prefix tokens (the CLS token and any register tokens). Both pool the output of the encoder's final LayerNorm.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

__all__ = ['POOLINGS', 'check_pooling', 'encode_pooled', 'pool_tokens']

POOLINGS = ('cls', 'mean_patch')


def check_pooling(pooling: str) -> str:
    """Return ``pooling`` if it names a pooling in ``POOLINGS``.

    Raises:
        ValueError: ``pooling`` is not one of ``POOLINGS``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f'Unknown pooling {pooling!r}. Valid poolings: {list(POOLINGS)}.')
    return pooling


def pool_tokens(tokens: torch.Tensor, pooling: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Pool tokens ``[B, T, D]`` into features ``[B, D]``.

    Args:
        tokens: token sequence ``[B, T, D]`` whose first ``num_prefix_tokens`` tokens are the CLS token followed by
            any register tokens.
        pooling: ``'cls'`` for token 0, or ``'mean_patch'`` for the mean of tokens ``num_prefix_tokens`` to ``T - 1``.
        num_prefix_tokens: number of tokens before the first patch token.

    Raises:
        ValueError: an unknown ``pooling``, ``tokens`` that are not 3-D, ``'cls'`` with no prefix token, or
            ``'mean_patch'`` with no patch token.
    """
    check_pooling(pooling)
    if tokens.ndim != 3:
        raise ValueError(f'tokens must have shape [batch, tokens, dim], got shape {tuple(tokens.shape)}.')
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f'num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}.')

    num_tokens = tokens.shape[1]
    if pooling == 'cls':
        if num_prefix_tokens < 1:
            raise ValueError(
                "pooling='cls' needs a CLS token at position 0, but num_prefix_tokens is 0. Use pooling='mean_patch'."
            )
        return tokens[:, 0]

    if num_tokens <= num_prefix_tokens:
        raise ValueError(
            f"pooling='mean_patch' needs patch tokens after the {num_prefix_tokens} prefix tokens, but the sequence "
            f'has only {num_tokens} tokens.'
        )
    return tokens[:, num_prefix_tokens:].mean(dim=1)


def encode_pooled(vit: VisionTransformer, images: torch.Tensor, pooling: str) -> torch.Tensor:
    """Encode images ``[B, 3, H, W]`` with ``vit`` and pool its final tokens into features ``[B, D]``.

    The tokens are the output of timm's ``forward_features``, which ends with the encoder's final LayerNorm.

    Raises:
        ValueError: an unknown ``pooling``, or ``'cls'`` for a ViT built without a CLS token.
    """
    check_pooling(pooling)
    if pooling == 'cls' and not getattr(vit, 'has_class_token', True):
        raise ValueError(
            f"pooling='cls' needs a ViT with a CLS token, but this {type(vit).__name__} was built with "
            "class_token=False. Use pooling='mean_patch'."
        )
    tokens = vit.forward_features(images)
    return pool_tokens(tokens, pooling, num_prefix_tokens=vit.num_prefix_tokens)
