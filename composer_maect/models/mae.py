"""Masked autoencoder (MAE) on a timm ViT: masked encoder, decoder, loss, FLOP count and the ComposerModel.

Notation: ``B`` images per view, ``V`` views, ``N`` patches per image, ``D`` encoder width, ``p`` patch size,
``C`` image channels and ``P = p_h * p_w * C`` pixel values per patch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from composer.models import ComposerModel
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from composer_maect.models.masking import num_kept_patches, random_masking
from composer_maect.models.pos_embed import build_fixed_pos_embed
from composer_maect.models.vit import init_weights_mae

__all__ = [
    'MAEDecoder',
    'MAEModel',
    'MaskedEncoder',
    'mae_forward_flops',
    'mae_loss',
    'patchify',
    'unpatchify',
]

_VIEW_KEY = re.compile(r'view(\d+)')


def _to_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def patchify(images: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """Cut images ``[B, C, H, W]`` into patches ``[B, N, p_h * p_w * C]``.

    Patches are in row-major grid order and the values inside a patch in ``(row, column, channel)`` order, as in the
    official MAE code. ``H`` and ``W`` may differ but must be multiples of the patch size.
    """
    patch_h, patch_w = _to_pair(patch_size)
    batch, channels, height, width = images.shape
    if height % patch_h != 0 or width % patch_w != 0:
        raise ValueError(f'Image size {(height, width)} is not a multiple of patch size {(patch_h, patch_w)}.')
    grid_h, grid_w = height // patch_h, width // patch_w
    x = images.reshape(batch, channels, grid_h, patch_h, grid_w, patch_w)
    x = torch.einsum('bchpwq->bhwpqc', x)
    return x.reshape(batch, grid_h * grid_w, patch_h * patch_w * channels)


def unpatchify(
    patches: torch.Tensor,
    patch_size: int | tuple[int, int],
    grid_size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
) -> torch.Tensor:
    """Reassemble patches ``[B, N, p_h * p_w * C]`` into images ``[B, C, grid_h * p_h, grid_w * p_w]``.

    This is the inverse of :func:`patchify`. ``grid_size`` is ``(grid_h, grid_w)``. Without it the grid must be
    square.
    """
    patch_h, patch_w = _to_pair(patch_size)
    batch, num_patches, patch_dim = patches.shape
    if patch_dim != patch_h * patch_w * in_chans:
        raise ValueError(
            f'Patches have {patch_dim} values, but patch size {(patch_h, patch_w)} with {in_chans} channels '
            f'needs {patch_h * patch_w * in_chans}.'
        )
    if grid_size is None:
        side = round(num_patches**0.5)
        if side * side != num_patches:
            raise ValueError(f'{num_patches} patches do not form a square grid. Pass grid_size=(grid_h, grid_w).')
        grid_size = side
    grid_h, grid_w = _to_pair(grid_size)
    if grid_h * grid_w != num_patches:
        raise ValueError(f'grid_size {(grid_h, grid_w)} does not match {num_patches} patches.')
    x = patches.reshape(batch, grid_h, grid_w, patch_h, patch_w, in_chans)
    x = torch.einsum('bhwpqc->bchpwq', x)
    return x.reshape(batch, in_chans, grid_h * patch_h, grid_w * patch_w)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise each patch of ``target`` ``[B, N, P]`` by its own mean and variance.

    Returns ``(normalized, mean, var)`` with ``mean`` and ``var`` ``[B, N, 1]``. The variance is the unbiased one
    and ``eps`` is added to it before the square root, as in the official MAE loss. A prediction made in the
    normalised space maps back to pixels as ``pred * (var + eps).sqrt() + mean``.
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5, mean, var


def mae_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    norm_pix_loss: bool = True,
) -> torch.Tensor:
    """Compute the MAE reconstruction loss: the mean squared error over masked patches.

    The per-patch squared error is averaged over the ``P`` values of a patch, then over all masked patches of the
    batch (so every masked patch has the same weight). With ``norm_pix_loss`` the target patch is first
    normalised by its own mean and variance (see :func:`normalize_patches`). Everything is computed in float32,
    whatever the input dtype. If ``mask`` marks no patch as masked (``mask_ratio`` 0), the mean runs over all
    patches instead.

    Args:
        pred: Predicted patches ``[B, N, P]``.
        target: Pixel patches ``[B, N, P]`` from :func:`patchify`.
        mask: ``[B, N]``, 1 for masked and 0 for visible patches.
        norm_pix_loss: Normalise the target per patch.

    Returns:
        A float32 scalar.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f'Shape mismatch: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal '
            f'[B, N, P] and mask {tuple(mask.shape)} must be [B, N].'
        )
    pred = pred.float()
    target = target.float()
    mask = mask.float()
    if norm_pix_loss:
        target, _, _ = normalize_patches(target)

    per_patch = (pred - target).pow(2).mean(dim=-1)  # [B, N]
    # No host synchronisation: fall back to all patches through a tensor-valued condition.
    weights = torch.where(mask.sum() > 0, mask, torch.ones_like(mask))
    return (per_patch * weights).sum() / weights.sum()


class MaskedEncoder(nn.Module):
    """Encoder half of MAE: a timm ViT (``self.vit``) that encodes only the visible patches.

    Forward order, as in the official MAE encoder: patch embedding, add ``pos_embed[:, 1:]``, random masking,
    prepend ``cls_token + pos_embed[:, :1]``, the ViT's ``norm_pre`` (identity for standard ViTs), the blocks and
    the final ``norm``. The ViT's parameter names are unchanged under the ``vit.`` prefix.

    ``fsdp_wrap_fn`` and ``activation_checkpointing_fn`` select every transformer block, because Composer looks
    them up on the direct children of a ComposerModel.

    Raises:
        TypeError: If ``vit`` is not a timm VisionTransformer.
        ValueError: If the ViT has no single CLS token with a position-embedding row, its pos_embed does not match
            its patch grid, it uses patch dropout or dynamic image sizes, or its final norm sits after pooling.
    """

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        _validate_vit(vit)
        self.vit = vit
        # timm ViTs built with another block_fn (e.g. ResPostBlock) use that class for their blocks.
        self._block_types = tuple({type(block) for block in vit.blocks}) or (Block,)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Return True for the transformer blocks, which Composer's FSDP wrapping then shards one by one."""
        return isinstance(module, self._block_types)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Return True for the transformer blocks, whose activations Composer then recomputes in backward."""
        return isinstance(module, self._block_types)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.img_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def in_chans(self) -> int:
        return self.vit.patch_embed.proj.in_channels

    def forward(self, images: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches of ``images`` ``[B, C, H, W]``.

        Returns:
            ``(latent, mask, ids_restore)``: ``latent`` ``[B, 1 + len_keep, D]`` (CLS token first),
            ``mask`` ``[B, N]`` (1 = removed) and ``ids_restore`` ``[B, N]`` (see :func:`random_masking`).
        """
        vit = self.vit
        x = vit.patch_embed(images)  # [B, N, D]
        x = x + vit.pos_embed[:, 1:, :]
        x, mask, ids_restore = random_masking(x, mask_ratio)

        cls_token = vit.cls_token + vit.pos_embed[:, :1, :]
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = vit.pos_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        return x, mask, ids_restore


def _validate_vit(vit: nn.Module) -> None:
    if not isinstance(vit, VisionTransformer):
        raise TypeError(
            f'MaskedEncoder needs a timm VisionTransformer, got {type(vit).__name__}. Build one with '
            'composer_maect.models.vit.create_encoder.'
        )
    problems = []
    if vit.cls_token is None or vit.num_prefix_tokens != 1:
        problems.append('it must have exactly one prefix token, the CLS token')
    if vit.pos_embed is None or vit.no_embed_class:
        problems.append('it must have a pos_embed with a CLS row')
    elif vit.pos_embed.shape[1] != 1 + vit.patch_embed.num_patches:
        problems.append(
            f'its pos_embed has {vit.pos_embed.shape[1]} rows for {vit.patch_embed.num_patches} patches plus CLS'
        )
    if vit.dynamic_img_size:
        problems.append('dynamic_img_size must be False')
    if not isinstance(vit.patch_drop, nn.Identity):
        problems.append('patch_drop_rate must be 0 because random masking replaces patch dropout')
    if not isinstance(vit.fc_norm, nn.Identity):
        problems.append(
            "its final norm is applied after pooling (global_pool='avg' enables fc_norm by default), but MAE "
            'needs it on the tokens; pass fc_norm=False'
        )
    if problems:
        raise ValueError('Invalid ViT for MAE: ' + '; '.join(problems) + '.')


class MAEDecoder(nn.Module):
    """Decoder half of MAE: restores the full token sequence and predicts the pixels of every patch.

    Parameter names follow the official MAE code (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
    ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``), so the decoder keys of its ``_full`` checkpoints map
    one to one. ``decoder_pos_embed`` ``[1, 1 + N, decoder_dim]`` is the fixed 2-D sin-cos table with a zero CLS
    row. The blocks are timm ``Block``s with ``qkv_bias=True`` and LayerNorm eps 1e-6. Weights are initialised as
    in MAE (see :func:`~composer_maect.models.vit.init_weights_mae`).

    Args:
        grid_size: Patch grid ``(grid_h, grid_w)`` of the encoder.
        patch_size: Patch size ``(p_h, p_w)``.
        in_chans: Image channels ``C``.
        encoder_dim: Width ``D`` of the encoder's output tokens.
        decoder_dim: Decoder width, a multiple of 4 and of ``num_heads``.
        depth: Number of decoder blocks.
        num_heads: Attention heads per decoder block.
        mlp_ratio: MLP hidden width as a multiple of ``decoder_dim``.
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        in_chans: int,
        encoder_dim: int,
        *,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if decoder_dim <= 0 or decoder_dim % 4 != 0:
            raise ValueError(f'decoder_dim must be a positive multiple of 4, got {decoder_dim}.')
        if num_heads <= 0 or decoder_dim % num_heads != 0:
            raise ValueError(f'decoder_dim {decoder_dim} must be divisible by num_heads {num_heads}.')
        if depth < 0:
            raise ValueError(f'decoder depth must be >= 0, got {depth}.')

        self.grid_size = _to_pair(grid_size)
        self.patch_size = _to_pair(patch_size)
        self.in_chans = in_chans
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.decoder_dim = decoder_dim
        norm_layer = partial(LayerNorm, eps=1e-6)

        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = build_fixed_pos_embed(decoder_dim, self.grid_size)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size[0] * self.patch_size[1] * in_chans, bias=True)
        init_weights_mae(self)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """Return True for the decoder blocks, which Composer's FSDP wrapping then shards one by one."""
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Return True for the decoder blocks, whose activations Composer then recomputes in backward."""
        return isinstance(module, Block)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict all patches from the encoder output.

        Args:
            latent: Encoder tokens ``[B, 1 + len_keep, D]``, CLS first.
            ids_restore: ``[B, N]`` from the masking step.

        Returns:
            Predicted patches ``[B, N, P]`` in the normalised-pixel space when the model trains with
            ``norm_pix_loss``.
        """
        x = self.decoder_embed(latent)  # [B, 1 + len_keep, decoder_dim]
        batch, num_tokens, dim = x.shape
        num_masked = ids_restore.shape[1] + 1 - num_tokens
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, num_masked, -1)

        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [B, N, decoder_dim], shuffled order
        patches = torch.gather(patches, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        x = torch.cat([x[:, :1, :], patches], dim=1)
        x = x + self.decoder_pos_embed

        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]


def _block_forward_flops(block: nn.Module, num_tokens: int) -> int:
    """Count the matmul FLOPs of one transformer block on ``num_tokens`` tokens (2 FLOPs per multiply-add)."""
    linear = sum(
        2 * num_tokens * module.in_features * module.out_features
        for module in block.modules()
        if isinstance(module, nn.Linear)
    )
    attn = block.attn
    attn_dim = attn.num_heads * attn.head_dim
    # Scores q @ k^T and the weighted sum attn @ v, summed over heads: each is num_tokens^2 * attn_dim MACs.
    attention = 2 * 2 * num_tokens * num_tokens * attn_dim
    return linear + attention


def mae_forward_flops(encoder: MaskedEncoder, decoder: MAEDecoder, mask_ratio: float) -> int:
    """Count the forward matmul FLOPs of MAE for one image (2 FLOPs per multiply-add).

    Counted: the patch embedding on all ``N`` patches; per encoder block on ``1 + len_keep`` tokens every Linear
    layer (qkv, attention output projection, MLP) plus the attention scores and the attention-weighted values;
    ``decoder_embed`` on ``1 + len_keep`` tokens; the same per decoder block on ``1 + N`` tokens; and
    ``decoder_pred`` on ``1 + N`` tokens (the CLS prediction is computed and then dropped). Not counted:
    LayerNorm, softmax, GELU, bias additions, residual additions, masking and the loss.
    """
    num_patches = encoder.num_patches
    encoder_tokens = 1 + num_kept_patches(num_patches, mask_ratio)
    decoder_tokens = 1 + num_patches

    proj = encoder.vit.patch_embed.proj
    patch_values = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    flops = 2 * num_patches * patch_values * proj.out_channels
    flops += sum(_block_forward_flops(block, encoder_tokens) for block in encoder.vit.blocks)

    embed = decoder.decoder_embed
    flops += 2 * encoder_tokens * embed.in_features * embed.out_features
    flops += sum(_block_forward_flops(block, decoder_tokens) for block in decoder.decoder_blocks)
    pred = decoder.decoder_pred
    flops += 2 * decoder_tokens * pred.in_features * pred.out_features
    return flops


class MAEModel(ComposerModel):
    """Masked autoencoder pre-training of a timm ViT as a Composer model.

    Direct children: ``encoder`` (:class:`MaskedEncoder`, the ViT is ``encoder.vit``) and ``decoder``
    (:class:`MAEDecoder`). Both have ``fsdp_wrap_fn`` and ``activation_checkpointing_fn`` that select every
    transformer block. The encoder is used as given, so a pretrained ViT keeps its weights, while the decoder is
    initialised as in MAE.

    Batches are dicts with ``'image'`` ``[B, C, H, W]``, or with views ``'view0'``, ``'view1'``, ... that are
    concatenated on the batch axis in index order (view 0 first). Other keys (``'label'``, ``'index'``) are
    ignored. A bare image tensor is accepted too.

    Args:
        encoder: A ViT from :func:`~composer_maect.models.vit.create_encoder`.
        mask_ratio: Fraction of patches removed per image, in ``[0, 1)``.
        decoder_dim: Decoder width.
        decoder_depth: Number of decoder blocks.
        decoder_num_heads: Attention heads per decoder block.
        norm_pix_loss: Regress per-patch normalised pixels (see :func:`mae_loss`).

    Example:
        >>> from composer_maect.models import MAEModel, create_encoder
        >>> model = MAEModel(create_encoder('vit_base_patch16'), mask_ratio=0.75)
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        *,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = MaskedEncoder(encoder)
        num_kept_patches(self.encoder.num_patches, mask_ratio)  # validates mask_ratio
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder = MAEDecoder(
            self.encoder.grid_size,
            self.encoder.patch_size,
            self.encoder.in_chans,
            self.encoder.embed_dim,
            decoder_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
        )

    def _collect_views(self, batch: Any) -> list[torch.Tensor]:
        """Return the image tensors of ``batch``, one ``[B, C, H, W]`` tensor per view, after validating them."""
        if isinstance(batch, torch.Tensor):
            views = [batch]
        elif isinstance(batch, Mapping):
            view_keys = sorted((k for k in batch if isinstance(k, str) and _VIEW_KEY.fullmatch(k)), key=_view_index)
            if view_keys and 'image' in batch:
                raise ValueError(f"Batch has both 'image' and view keys {view_keys}. MAEModel needs one or the other.")
            if view_keys:
                expected = [f'view{i}' for i in range(len(view_keys))]
                if view_keys != expected:
                    raise ValueError(f'View keys must be consecutive from view0, got {view_keys}.')
                views = [batch[key] for key in view_keys]
            elif 'image' in batch:
                views = [batch['image']]
            else:
                raise KeyError(f"Batch has no 'image' or 'view0' key; its keys are {sorted(map(str, batch))}.")
        else:
            raise TypeError(
                f"MAEModel expects a dict batch with 'image' or 'view0', 'view1', ..., got {type(batch).__name__}."
            )

        expected_shape = (self.encoder.in_chans, *self.encoder.img_size)
        for i, view in enumerate(views):
            if not isinstance(view, torch.Tensor) or view.ndim != 4 or tuple(view.shape[1:]) != expected_shape:
                shape = tuple(view.shape) if isinstance(view, torch.Tensor) else type(view).__name__
                raise ValueError(
                    f'View {i} of the batch has shape {shape}, but the encoder expects [B, {expected_shape[0]}, '
                    f'{expected_shape[1]}, {expected_shape[2]}]. Resize the images in the data pipeline or '
                    'create the encoder with a matching img_size and in_chans.'
                )
        return views

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Mask, encode and decode every view of the batch.

        Returns:
            ``{'pred': [V*B, N, P], 'mask': [V*B, N] (1 = masked), 'target': [V*B, N, P]}``. ``target`` contains
            the input pixels from :func:`patchify`, before any per-patch normalisation.
        """
        views = self._collect_views(batch)
        images = views[0] if len(views) == 1 else torch.cat(views, dim=0)
        latent, mask, ids_restore = self.encoder(images, self.mask_ratio)
        pred = self.decoder(latent, ids_restore)
        target = patchify(images, self.encoder.patch_size)
        return {'pred': pred, 'mask': mask, 'target': target}

    def loss(self, outputs: dict[str, torch.Tensor], batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Return the float32 MAE loss of ``outputs`` (see :func:`mae_loss`)."""
        return mae_loss(outputs['pred'], outputs['target'], outputs['mask'], norm_pix_loss=self.norm_pix_loss)

    def get_metrics(self, is_train: bool = False) -> dict:
        """Return no metrics: MAE pre-training is tracked by its loss only."""
        return {}

    def flops_per_batch(self, batch: Any) -> int:
        """Count the forward plus backward matmul FLOPs of ``batch`` for Composer's SpeedMonitor.

        The backward pass is counted as twice the forward pass, so the result is ``3 * num_images *``
        :func:`mae_forward_flops`. This slightly overcounts the patch embedding, whose input needs no gradient.
        """
        num_images = sum(view.shape[0] for view in self._collect_views(batch))
        return 3 * num_images * mae_forward_flops(self.encoder, self.decoder, self.mask_ratio)


def _view_index(key: str) -> int:
    return int(_VIEW_KEY.fullmatch(key).group(1))
