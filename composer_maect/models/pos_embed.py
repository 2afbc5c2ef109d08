"""Fixed 2-D sin-cos position embeddings in the layout of the official MAE code.

The table for a ``grid_height x grid_width`` patch grid has one row per patch in row-major order (the order of
``PatchEmbed``'s flattened output). Channels ``[0, D/2)`` encode the patch's column (w) coordinate and channels
``[D/2, D)`` its row (h) coordinate. Each half is ``[sin(pos * omega), cos(pos * omega)]`` with
``omega_i = 1 / 10000 ** (i / (D / 4))`` for ``i = 0 .. D/4 - 1``. The column-first order comes from the official code
building its grid with ``np.meshgrid(grid_w, grid_h)``, so checkpoints trained with that code expect it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ['build_fixed_pos_embed', 'get_1d_sincos_pos_embed', 'get_2d_sincos_pos_embed']


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Embed 1-D positions ``[M]`` as ``[M, embed_dim]``: the sines of all frequencies, then the cosines.

    Computed in float64 so that the table does not depend on the default dtype. ``embed_dim`` must be even.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f'embed_dim must be even for a 1-D sin-cos embedding, got {embed_dim}.')
    positions = positions.to(torch.float64).reshape(-1)
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=positions.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [embed_dim / 2]
    angles = torch.outer(positions, omega)  # [M, embed_dim / 2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    *,
    cls_token: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Build the float32 table ``[(1 if cls_token) + grid_height * grid_width, embed_dim]``.

    Args:
        embed_dim: Channels per token, a multiple of 4.
        grid_size: Patch grid as ``grid_height`` for a square grid, or ``(grid_height, grid_width)``.
        cls_token: Prepend an all-zero row for the CLS token, as the official MAE code does.
        device: Device of the returned table (default: the current default device).

    Raises:
        ValueError: If ``embed_dim`` is not a positive multiple of 4 or the grid is empty.
    """
    if embed_dim <= 0 or embed_dim % 4 != 0:
        raise ValueError(
            f'embed_dim must be a positive multiple of 4 for a 2-D sin-cos position embedding, got {embed_dim}.'
        )
    grid_height, grid_width = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if grid_height <= 0 or grid_width <= 0:
        raise ValueError(f'grid_size must be positive in both dimensions, got {grid_size!r}.')

    rows = torch.arange(grid_height, dtype=torch.float64, device=device)
    cols = torch.arange(grid_width, dtype=torch.float64, device=device)
    # Row-major token order: h is the outer index and w the inner one.
    grid_h, grid_w = torch.meshgrid(rows, cols, indexing='ij')  # each [grid_height, grid_width]
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid_w)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid_h)
    table = torch.cat([emb_w, emb_h], dim=1)  # [grid_height * grid_width, embed_dim]

    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)
    return table.to(torch.float32)


def build_fixed_pos_embed(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Parameter:
    """Build a frozen ``[1, 1 + N, embed_dim]`` parameter: a zero CLS row followed by the 2-D sin-cos table.

    The tensor is a parameter, not a buffer, so that its state-dict key and shape match timm and official MAE
    checkpoints (``pos_embed``, ``decoder_pos_embed``). ``requires_grad`` is False, so optimizers built from
    ``requires_grad`` parameters skip it.
    """
    table = get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True, device=device)
    return nn.Parameter(table.to(dtype).unsqueeze(0), requires_grad=False)
