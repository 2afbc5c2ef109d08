"""``ViTEncoderModel``: a timm ViT as a ComposerModel with no objective of its own, for the MAE-CT phases.

Head initialisation and contrastive tuning train only the NNCLR objective that ``ContrastiveTuning`` adds, so the
model's own forward does nothing and its loss is zero. The algorithm encodes the views itself and replaces the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from composer.models import ComposerModel
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ['ViTEncoderModel', 'encoder_forward_flops']


def encoder_forward_flops(vit: VisionTransformer) -> tuple[int, list[int]]:
    """Count the forward matmul FLOPs of ``vit`` on one full image (2 FLOPs per multiply-add).

    Returns:
        ``(patch_embed_flops, block_flops)``: the patch embedding, and one entry per transformer block (every
        Linear layer plus attention scores and weighted values on ``1 + N`` tokens). LayerNorm, softmax, GELU and
        additions are not counted.
    """
    proj = vit.patch_embed.proj
    num_patches = vit.patch_embed.num_patches
    tokens = num_patches + vit.num_prefix_tokens
    patch_flops = 2 * num_patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * proj.out_channels
    blocks = []
    for block in vit.blocks:
        linear = sum(2 * tokens * m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear))
        attention = 4 * tokens * tokens * block.attn.num_heads * block.attn.head_dim
        blocks.append(linear + attention)
    return patch_flops, blocks


class ViTEncoderModel(ComposerModel):
    """A timm ``VisionTransformer`` (``self.encoder``) trained only by algorithms such as ``ContrastiveTuning``.

    ``forward`` returns an empty dict and ``loss`` a zero scalar, so an algorithm must replace the loss
    (``ContrastiveTuning`` with ``loss_mode='replace'``); otherwise backward fails because nothing requires a gradient.
    ``encoder`` has
    ``fsdp_wrap_fn`` and ``activation_checkpointing_fn`` that select every transformer block.
    """

    def __init__(self, encoder: VisionTransformer, views: int = 2) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f'ViTEncoderModel needs a timm VisionTransformer, got {type(encoder).__name__}.')
        self.encoder = encoder
        self.views = views
        block_types = tuple({type(block) for block in encoder.blocks})
        encoder.fsdp_wrap_fn = lambda module: isinstance(module, block_types)
        encoder.activation_checkpointing_fn = lambda module: isinstance(module, block_types)

    def forward(self, batch: Any) -> dict:
        return {}

    def loss(self, outputs: Any, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return zero: the objective comes from an algorithm that replaces ``state.loss``."""
        return torch.zeros((), device=self.encoder.cls_token.device)

    def get_metrics(self, is_train: bool = False) -> dict:
        return {}

    def flops_per_batch(self, batch: Any) -> int:
        """Count forward and backward matmul FLOPs of the encoder on ``views`` views of every image.

        Blocks with trainable parameters cost 3x their forward (forward, input gradient, weight gradient). Frozen blocks
        below the lowest trainable one cost only their forward, because no gradient reaches them. The head is not
        counted.
        """
        images = _batch_size(batch)
        patch_flops, blocks = encoder_forward_flops(self.encoder)
        trainable = [any(p.requires_grad for p in block.parameters()) for block in self.encoder.blocks]
        first_trainable = trainable.index(True) if any(trainable) else len(blocks)
        per_view = patch_flops + sum(blocks[:first_trainable]) + 3 * sum(blocks[first_trainable:])
        return images * self.views * per_view


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for key in ('view0', 'image'):
            if key in batch:
                return int(batch[key].shape[0])
    if isinstance(batch, list | tuple):
        return int(batch[0].shape[0])
    return int(batch.shape[0])
