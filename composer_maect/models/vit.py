"""ViT encoders built by ``timm.create_model``, with MAE's fixed position embeddings and initialisation."""

from __future__ import annotations

import logging
import re
from typing import Any

import timm
import torch
from timm.models import is_model_in_modules
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from composer_maect.models.pos_embed import build_fixed_pos_embed

__all__ = [
    'ENCODER_ALIASES',
    'check_patch_grid',
    'compile_encoder_blocks',
    'create_encoder',
    'init_weights_mae',
    'resolve_encoder_name',
]

log = logging.getLogger(__name__)

# Alias -> (timm model name, keyword arguments that the alias fixes). All timm models listed here use a
# LayerNorm with eps 1e-6 and qkv_bias=True, as the official MAE encoders do (timm 1.0.31 defaults).
ENCODER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    'vit_tiny_patch16': ('vit_tiny_patch16_224', {}),
    'vit_small_patch16': ('vit_small_patch16_224', {}),
    'vit_base_patch16': ('vit_base_patch16_224', {}),
    'vit_large_patch16': ('vit_large_patch16_224', {}),
    'vit_huge_patch14': ('vit_huge_patch14_224', {}),
    # ViT-H/16 is the H/14 architecture (1280 dim, 32 blocks, 16 heads) with 16x16 patches.
    'vit_huge_patch16': ('vit_huge_patch14_224', {'patch_size': 16}),
}

# Keyword arguments that create_encoder sets itself, so passing them would silently conflict.
_FIXED_KWARGS = ('pretrained', 'num_classes')

_PATCH_IN_NAME = re.compile(r'patch(\d+)')

# timm modules whose models are VisionTransformer instances. Each built model is still checked for the token
# layout that MAE needs (one CLS token, a position embedding with a CLS row).
_VIT_MODULES = ('vision_transformer', 'deit')


def resolve_encoder_name(name: str) -> tuple[str, dict[str, Any]]:
    """Map an alias or a timm model name to ``(timm_name, fixed_kwargs)``.

    Raises:
        ValueError: If ``name`` is neither an alias nor a timm model defined in timm's ViT or DeiT module.
    """
    if name in ENCODER_ALIASES:
        timm_name, fixed_kwargs = ENCODER_ALIASES[name]
        return timm_name, dict(fixed_kwargs)
    if not timm.is_model(name):
        raise ValueError(
            f'Unknown encoder name {name!r}. Use one of the aliases {sorted(ENCODER_ALIASES)} '
            "or a timm ViT name such as 'vit_base_patch16_224' (list them with timm.list_models('vit_*'))."
        )
    if not is_model_in_modules(name, _VIT_MODULES):
        raise ValueError(
            f'timm model {name!r} is not a plain ViT (it is defined outside the timm modules {_VIT_MODULES}). '
            f'Use one of the aliases {sorted(ENCODER_ALIASES)} or another timm ViT name.'
        )
    return name, {}


def _to_pair(size: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f'{what} must be a positive int or a pair of positive ints, got {size!r}.')
    return pair


def _check_divisible(img_size: tuple[int, int], patch_size: tuple[int, int]) -> None:
    if img_size[0] % patch_size[0] != 0 or img_size[1] % patch_size[1] != 0:
        nearest = tuple(max(p, s // p * p) for s, p in zip(img_size, patch_size, strict=True))
        raise ValueError(
            f'img_size {img_size} is not a multiple of patch_size {patch_size}. Choose an img_size that is a '
            f'multiple of the patch size (e.g. {nearest}) or a patch size that divides the image size.'
        )


def check_patch_grid(
    name: str,
    img_size: int | tuple[int, int],
    patch_size: int | tuple[int, int] | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> None:
    """Check, without building the model, that ``img_size`` is a multiple of the encoder's patch size.

    The patch size is ``timm_kwargs['patch_size']``, else ``patch_size``, else the alias's fixed patch size, else the
    ``patch<k>`` in the timm model name. A name without one passes here, and ``create_encoder`` checks the built model.

    Raises:
        ValueError: On an unknown encoder name, an invalid size, or an image size that is not a multiple of the
            patch size. The message names both sizes and the nearest valid image size.
    """
    timm_name, model_kwargs = resolve_encoder_name(name)
    # The same precedence as in create_encoder: timm_kwargs over patch_size over the alias.
    if patch_size is not None:
        model_kwargs['patch_size'] = patch_size
    model_kwargs.update(timm_kwargs or {})
    expected_patch = model_kwargs.get('patch_size')
    if expected_patch is None:
        match = _PATCH_IN_NAME.search(timm_name)
        expected_patch = int(match.group(1)) if match else None
    if expected_patch is not None:
        _check_divisible(_to_pair(img_size, 'img_size'), _to_pair(expected_patch, 'patch_size'))


@torch.no_grad()
def init_weights_mae(module: nn.Module) -> None:
    """Initialise ``module`` and its submodules as the official MAE code does.

    Linear weights get Xavier-uniform and zero biases. LayerNorm weights are 1 and biases 0. A ViT patch embedding's
    convolution weight gets Xavier-uniform on its ``[out, in * p * p]`` view, because it acts like a Linear layer on
    flattened patches, and its bias keeps the value it was constructed with. Parameters named ``cls_token`` or
    ``mask_token`` are drawn from N(0, 0.02^2). Position embeddings are left untouched, so fixed tables stay fixed.
    """
    for submodule in module.modules():
        if isinstance(submodule, nn.Linear):
            nn.init.xavier_uniform_(submodule.weight)
            if submodule.bias is not None:
                nn.init.zeros_(submodule.bias)
        elif isinstance(submodule, nn.LayerNorm):
            if submodule.weight is not None:
                nn.init.ones_(submodule.weight)
            if submodule.bias is not None:
                nn.init.zeros_(submodule.bias)

        proj = getattr(getattr(submodule, 'patch_embed', None), 'proj', None)
        if isinstance(proj, nn.Conv2d):
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))

    for name, param in module.named_parameters():
        if name.rsplit('.', 1)[-1] in ('cls_token', 'mask_token'):
            nn.init.normal_(param, std=0.02)


def create_encoder(
    name: str,
    *,
    img_size: int | tuple[int, int] = 224,
    patch_size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """Create a randomly initialised timm ViT encoder for MAE.

    The model comes from ``timm.create_model`` with ``pretrained=False`` and ``num_classes=0``. Its learned
    ``pos_embed`` is replaced by the fixed 2-D sin-cos table ``[1, 1 + N, D]`` (CLS row zero, ``requires_grad``
    False), and all weights are initialised as in MAE (see :func:`init_weights_mae`).

    Args:
        name: An alias from :data:`ENCODER_ALIASES` (``'vit_base_patch16'``, ``'vit_huge_patch14'``, ...) or any
            timm ViT model name.
        img_size: Input resolution, an int for square images or ``(height, width)``.
        patch_size: Patch size. Default: the patch size of the named model.
        in_chans: Number of input image channels.
        **timm_kwargs: Passed to ``timm.create_model``, e.g. ``depth``, ``embed_dim``, ``num_heads``,
            ``drop_path_rate``.

    Raises:
        ValueError: On an unknown name, a keyword that this function fixes, or an image size that is not a
            multiple of the patch size. Also when the timm model is not a ViT with one CLS token and a position
            embedding row for it.
    """
    timm_name, model_kwargs = resolve_encoder_name(name)
    fixed = [key for key in _FIXED_KWARGS if key in timm_kwargs]
    if fixed:
        raise ValueError(
            f'create_encoder always sets pretrained=False and num_classes=0. Remove {fixed} from its arguments.'
        )
    img_size = _to_pair(img_size, 'img_size')
    if patch_size is not None:
        model_kwargs['patch_size'] = patch_size
    model_kwargs.update(timm_kwargs)

    # Check the image/patch sizes before building a possibly large model. A name without 'patch<k>' is checked
    # against the model's actual patch size after it is built.
    check_patch_grid(name, img_size, patch_size, timm_kwargs)

    model = timm.create_model(
        timm_name,
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        in_chans=in_chans,
        **model_kwargs,
    )
    _validate_encoder(model, name)
    _check_divisible(img_size, tuple(model.patch_embed.patch_size))

    old = model.pos_embed
    model.pos_embed = build_fixed_pos_embed(
        model.embed_dim, tuple(model.patch_embed.grid_size), device=old.device, dtype=old.dtype
    )
    init_weights_mae(model)
    log.info(
        'Created encoder %s (timm %s): img_size=%s, patch_size=%s, embed_dim=%d, depth=%d, %d parameters.',
        name,
        timm_name,
        img_size,
        tuple(model.patch_embed.patch_size),
        model.embed_dim,
        len(model.blocks),
        sum(p.numel() for p in model.parameters()),
    )
    return model


def _validate_encoder(model: nn.Module, name: str) -> None:
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f'{name!r} builds a {type(model).__name__}, not a timm VisionTransformer. Use a plain ViT name '
            f'such as one of {sorted(ENCODER_ALIASES)}.'
        )
    problems = []
    if model.cls_token is None:
        problems.append('it has no CLS token (class_token=False)')
    if model.num_prefix_tokens != 1:
        problems.append(f'it has {model.num_prefix_tokens} prefix tokens (register tokens are not supported)')
    if model.pos_embed is None:
        problems.append('it has no position embedding')
    if model.no_embed_class:
        problems.append('its position embedding has no CLS row (no_embed_class=True)')
    if model.dynamic_img_size:
        problems.append('it uses dynamic_img_size=True')
    if problems:
        raise ValueError(f'Encoder {name!r} cannot be used for MAE because ' + ' and '.join(problems) + '.')


def compile_encoder_blocks(vit: VisionTransformer, **compile_kwargs: Any) -> None:
    """Compile every transformer block of ``vit`` in place with ``torch.compile`` (``nn.Module.compile``).

    Compiling the blocks rather than the model keeps the state-dict keys, and it also speeds up callers that run
    the blocks without the model's ``forward``, as ``ContrastiveTuning`` and the MAE model do. ``compile_kwargs`` go to
    ``torch.compile`` (for example ``mode`` or ``dynamic``).

    NOTE: tested on the CPU without FSDP. Composer wraps blocks for FSDP and activation checkpointing after this
    runs, and that combination has not been run here.
    """
    for block in vit.blocks:
        block.compile(**compile_kwargs)
