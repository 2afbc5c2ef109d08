"""Tests for the 2-D sin-cos position embedding and create_encoder."""

import math

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from composer_maect.models import ENCODER_ALIASES, build_fixed_pos_embed, create_encoder, get_2d_sincos_pos_embed


def reference_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Slow reference: one loop per token and frequency, written from the MAE formula.

    Token t = h * grid_w + w. With q = embed_dim / 4 and omega_i = 1 / 10000 ** (2 i / (embed_dim / 2)), channels
    [0, q) are sin(w omega), [q, 2q) cos(w omega), [2q, 3q) sin(h omega) and [3q, 4q) cos(h omega).
    """
    quarter = embed_dim // 4
    table = np.zeros((grid_h * grid_w, embed_dim), dtype=np.float64)
    for h in range(grid_h):
        for w in range(grid_w):
            token = h * grid_w + w
            for i in range(quarter):
                omega = 1.0 / 10000 ** (2 * i / (embed_dim / 2))
                table[token, i] = math.sin(w * omega)
                table[token, quarter + i] = math.cos(w * omega)
                table[token, 2 * quarter + i] = math.sin(h * omega)
                table[token, 3 * quarter + i] = math.cos(h * omega)
    return table


def vit_param_count(embed_dim: int, depth: int, patch: int, img: int = 224, in_chans: int = 3) -> int:
    """Parameters of a timm ViT with num_classes=0, qkv_bias, MLP ratio 4 and a CLS token."""
    num_patches = (img // patch) ** 2
    patch_embed = in_chans * patch * patch * embed_dim + embed_dim
    block = 12 * embed_dim**2 + 13 * embed_dim  # qkv, proj, fc1, fc2 with biases, two LayerNorms
    return patch_embed + embed_dim + (1 + num_patches) * embed_dim + depth * block + 2 * embed_dim


@pytest.mark.parametrize(('embed_dim', 'grid'), [(16, (4, 4)), (32, (3, 5)), (64, (7, 2)), (1280, (16, 16))])
def test_pos_embed_matches_reference(embed_dim, grid):
    table = get_2d_sincos_pos_embed(embed_dim, grid)
    expected = reference_pos_embed(embed_dim, *grid)
    assert table.dtype == torch.float32
    assert table.shape == (grid[0] * grid[1], embed_dim)
    np.testing.assert_allclose(table.numpy(), expected, atol=1e-6, rtol=0)


def test_pos_embed_int_grid_is_square():
    torch.testing.assert_close(get_2d_sincos_pos_embed(8, 3), get_2d_sincos_pos_embed(8, (3, 3)))


def test_pos_embed_first_half_encodes_column():
    table = get_2d_sincos_pos_embed(8, (2, 3))  # tokens: (h, w) = (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
    half = 4
    # Tokens in the same column share the first half; tokens in the same row share the second half.
    torch.testing.assert_close(table[0, :half], table[3, :half])
    torch.testing.assert_close(table[0, half:], table[2, half:])
    assert not torch.allclose(table[0, :half], table[1, :half])


def test_pos_embed_cls_row_is_zero():
    table = get_2d_sincos_pos_embed(16, (2, 3), cls_token=True)
    assert table.shape == (7, 16)
    assert torch.count_nonzero(table[0]) == 0
    torch.testing.assert_close(table[1:], get_2d_sincos_pos_embed(16, (2, 3)))


def test_fixed_pos_embed_not_trainable():
    param = build_fixed_pos_embed(16, (2, 3))
    assert isinstance(param, nn.Parameter)
    assert param.shape == (1, 7, 16)
    assert not param.requires_grad
    assert torch.count_nonzero(param[0, 0]) == 0


@pytest.mark.parametrize('embed_dim', [0, 6, 18])
def test_pos_embed_invalid_dim(embed_dim):
    with pytest.raises(ValueError, match='multiple of 4'):
        get_2d_sincos_pos_embed(embed_dim, 4)


def test_pos_embed_invalid_grid():
    with pytest.raises(ValueError, match='grid_size'):
        get_2d_sincos_pos_embed(8, (0, 3))


# alias -> (embed_dim, depth, patch size)
ALIAS_SHAPES = {
    'vit_tiny_patch16': (192, 12, 16),
    'vit_small_patch16': (384, 12, 16),
    'vit_base_patch16': (768, 12, 16),
    'vit_large_patch16': (1024, 24, 16),
    'vit_huge_patch14': (1280, 32, 14),
    'vit_huge_patch16': (1280, 32, 16),
}


def test_alias_table_is_covered():
    assert set(ALIAS_SHAPES) == set(ENCODER_ALIASES)


@pytest.mark.parametrize('alias', sorted(ALIAS_SHAPES))
def test_create_encoder_alias_on_meta(alias):
    embed_dim, depth, patch = ALIAS_SHAPES[alias]
    with torch.device('meta'):
        vit = create_encoder(alias)

    assert isinstance(vit, VisionTransformer)
    assert vit.embed_dim == embed_dim
    assert len(vit.blocks) == depth
    assert tuple(vit.patch_embed.patch_size) == (patch, patch)
    assert sum(p.numel() for p in vit.parameters()) == vit_param_count(embed_dim, depth, patch)
    num_patches = (224 // patch) ** 2
    assert vit.pos_embed.shape == (1, 1 + num_patches, embed_dim)
    assert not vit.pos_embed.requires_grad
    assert isinstance(vit.head, nn.Identity)
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * depth + 1
    assert all(m.eps == 1e-6 for m in norms)


def test_encoder_sizes_match_published():
    with torch.device('meta'):
        base = create_encoder('vit_base_patch16')
        huge = create_encoder('vit_huge_patch14')
    base_params = sum(p.numel() for p in base.parameters())
    huge_params = sum(p.numel() for p in huge.parameters())
    assert abs(base_params - 86e6) / 86e6 < 0.01
    assert abs(huge_params - 632e6) / 632e6 < 0.01


def test_create_encoder_small_forward():
    torch.manual_seed(0)
    vit = create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
    features = vit.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 1 + 16, 64)
    assert torch.isfinite(features).all()
    expected = get_2d_sincos_pos_embed(64, (4, 4), cls_token=True)
    torch.testing.assert_close(vit.pos_embed.detach()[0], expected)


def test_create_encoder_mae_init():
    torch.manual_seed(0)
    vit = create_encoder('vit_small_patch16', img_size=64, depth=1)
    qkv = vit.blocks[0].attn.qkv
    bound = math.sqrt(6.0 / (qkv.in_features + qkv.out_features))  # Xavier-uniform bound
    assert qkv.weight.abs().max() <= bound
    assert qkv.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(qkv.bias) == 0
    proj = vit.patch_embed.proj.weight
    proj_bound = math.sqrt(6.0 / (proj.shape[0] + proj[0].numel()))
    assert proj.abs().max() <= proj_bound
    assert proj.abs().max() > 0.9 * proj_bound
    assert 0.015 < vit.cls_token.std().item() < 0.025
    torch.testing.assert_close(vit.norm.weight, torch.ones_like(vit.norm.weight))


def test_create_encoder_non_square():
    vit = create_encoder('vit_tiny_patch16', img_size=(32, 48), patch_size=8, depth=1, embed_dim=32, num_heads=2)
    assert tuple(vit.patch_embed.grid_size) == (4, 6)
    expected = get_2d_sincos_pos_embed(32, (4, 6), cls_token=True)
    torch.testing.assert_close(vit.pos_embed.detach()[0], expected)
    assert vit.forward_features(torch.randn(1, 3, 32, 48)).shape == (1, 25, 32)


def test_create_encoder_kwargs_pass_through():
    vit = create_encoder(
        'vit_base_patch16', img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3, drop_path_rate=0.2
    )
    assert len(vit.blocks) == 3
    assert vit.embed_dim == 48
    assert vit.blocks[0].attn.num_heads == 3
    drop_paths = [block.drop_path1 for block in vit.blocks]
    assert isinstance(drop_paths[0], nn.Identity)  # the stochastic-depth rate grows linearly from 0
    assert drop_paths[-1].drop_prob == pytest.approx(0.2)
    assert isinstance(vit.blocks[0], Block)


def test_create_encoder_timm_name():
    vit = create_encoder('vit_tiny_patch16_224', img_size=32, patch_size=16, depth=1)
    assert tuple(vit.patch_embed.grid_size) == (2, 2)


def test_create_encoder_in_chans():
    vit = create_encoder('vit_tiny_patch16', img_size=16, patch_size=4, in_chans=1, depth=1, embed_dim=32, num_heads=2)
    assert vit.patch_embed.proj.in_channels == 1
    assert vit.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, 17, 32)


@pytest.mark.parametrize(
    ('img_size', 'patch_size'),
    [(225, None), (224, 15), ((32, 40), 16)],
)
def test_create_encoder_invalid_size(img_size, patch_size):
    with pytest.raises(ValueError, match='not a multiple of patch_size') as info:
        create_encoder('vit_base_patch16', img_size=img_size, patch_size=patch_size, depth=1)
    assert 'img_size' in str(info.value)


def test_create_encoder_huge16_invalid_size():
    with pytest.raises(ValueError, match=r'\(16, 16\)'):
        create_encoder('vit_huge_patch16', img_size=100)


def test_create_encoder_unknown_name():
    with pytest.raises(ValueError, match='vit_base_patch16'):
        create_encoder('vit_gigantic_patch3')


@pytest.mark.parametrize('kwarg', ['pretrained', 'num_classes'])
def test_create_encoder_fixed_kwargs_rejected(kwarg):
    with pytest.raises(ValueError, match=kwarg):
        create_encoder('vit_tiny_patch16', **{kwarg: 1})


def test_create_encoder_rejects_non_vit():
    assert timm.is_model('resnet18')
    with pytest.raises(ValueError, match='not a plain ViT'):
        create_encoder('resnet18', img_size=32, patch_size=8)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'class_token': False, 'global_pool': 'avg'}, 'CLS'),
        ({'reg_tokens': 4}, 'prefix tokens'),
        ({'no_embed_class': True}, 'no_embed_class'),
    ],
)
def test_create_encoder_rejects_unsupported_layout(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=1, **kwargs)
