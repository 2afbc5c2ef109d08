"""Per-sample random masking of patch tokens, as in MAE."""

from __future__ import annotations

import torch

__all__ = ['num_kept_patches', 'random_masking']


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
    """Return how many of ``num_patches`` patch tokens stay visible: ``int(num_patches * (1 - mask_ratio))``.

    This is the official MAE formula, including its truncation towards zero. With 196 patches (224 px, 16 px patches)
    and ratio 0.75 it keeps 49.

    Raises:
        ValueError: If ``mask_ratio`` is outside ``[0, 1)`` or no patch would stay visible.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}.')
    len_keep = int(num_patches * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(
            f'mask_ratio {mask_ratio} keeps no patch visible out of {num_patches}. Use a smaller mask_ratio or a '
            'finer patch grid.'
        )
    return len_keep


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a uniformly random subset of ``len_keep`` patch tokens per sample.

    Each sample draws uniform noise per token, and the tokens with the smallest noise are kept, in that order.
    ``x`` must contain patch tokens only (no CLS token).

    Args:
        x: Patch tokens ``[batch, num_patches, dim]``.
        mask_ratio: Fraction of patches to remove, in ``[0, 1)``.
        generator: Random generator for the noise (default: the global generator of ``x``'s device).

    Returns:
        ``(x_kept, mask, ids_restore)``:

        * ``x_kept`` ``[batch, len_keep, dim]``: the kept tokens, in shuffled order.
        * ``mask`` ``[batch, num_patches]`` in ``x``'s dtype: 0 for kept and 1 for removed patches, in the
          original patch order.
        * ``ids_restore`` ``[batch, num_patches]`` int64: the inverse permutation. Gathering
          ``cat([x_kept, removed_tokens], dim=1)`` with it restores the original patch order.
    """
    batch, num_patches, dim = x.shape
    len_keep = num_kept_patches(num_patches, mask_ratio)

    noise = torch.rand(batch, num_patches, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise values are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)

    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, dim))

    mask = torch.ones(batch, num_patches, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_kept, mask, ids_restore
