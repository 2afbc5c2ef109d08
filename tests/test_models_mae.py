"""Tests for masking, patchify, the MAE loss, the masked encoder, the decoder and MAEModel."""

import math

import pytest
import torch
import torch.distributed
from composer import Trainer
from composer.callbacks import SpeedMonitor
from composer.loggers import InMemoryLogger
from composer.utils.parallelism import FSDP2Config
from timm.models.vision_transformer import Block
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, Dataset

from composer_maect.models import (
    MAEDecoder,
    MAEModel,
    MaskedEncoder,
    create_encoder,
    get_2d_sincos_pos_embed,
    mae_forward_flops,
    mae_loss,
    num_kept_patches,
    patchify,
    random_masking,
    unpatchify,
)

IMG = 32
PATCH = 8
NUM_PATCHES = (IMG // PATCH) ** 2


def tiny_encoder(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, **kwargs):
    return create_encoder(
        'vit_tiny_patch16',
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        **kwargs,
    )


def tiny_mae(**kwargs):
    torch.manual_seed(0)
    options = {'decoder_dim': 16, 'decoder_depth': 1, 'decoder_num_heads': 2}
    options.update(kwargs)
    return MAEModel(tiny_encoder(), **options)


def reference_mae_loss(pred, target, mask, norm_pix_loss):
    """Slow reference: a Python loop over samples and patches, in float64."""
    total = 0.0
    count = 0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if mask[b, n] != 1:
                continue
            patch = target[b, n].double()
            if norm_pix_loss:
                mean = patch.sum() / patch.numel()
                var = ((patch - mean) ** 2).sum() / (patch.numel() - 1)
                patch = (patch - mean) / torch.sqrt(var + 1e-6)
            total += ((pred[b, n].double() - patch) ** 2).sum().item() / patch.numel()
            count += 1
    return total / count


# ---------------------------------------------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize(
    ('num_patches', 'mask_ratio', 'expected'),
    [(196, 0.75, 49), (256, 0.75, 64), (15, 0.5, 7), (7, 0.75, 1), (49, 0.6, 19), (196, 0.0, 196)],
)
def test_num_kept_patches(num_patches, mask_ratio, expected):
    assert num_kept_patches(num_patches, mask_ratio) == expected


@pytest.mark.parametrize('mask_ratio', [1.0, -0.1, 1.5])
def test_num_kept_patches_invalid_ratio(mask_ratio):
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        num_kept_patches(196, mask_ratio)


def test_num_kept_patches_none_visible():
    with pytest.raises(ValueError, match='keeps no patch'):
        num_kept_patches(4, 0.8)


@pytest.mark.parametrize(('num_patches', 'mask_ratio'), [(196, 0.75), (15, 0.5), (7, 0.75), (16, 0.0)])
def test_random_masking_counts(num_patches, mask_ratio):
    x = torch.randn(5, num_patches, 3)
    x_kept, mask, ids_restore = random_masking(x, mask_ratio)
    len_keep = num_kept_patches(num_patches, mask_ratio)

    assert x_kept.shape == (5, len_keep, 3)
    assert mask.shape == (5, num_patches)
    assert mask.dtype == x.dtype
    assert ids_restore.shape == (5, num_patches)
    assert ids_restore.dtype == torch.int64
    assert torch.equal(mask.sum(dim=1), torch.full((5,), float(num_patches - len_keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_random_masking_restore_inverts_shuffle():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 6)
    x_kept, mask, ids_restore = random_masking(x, 0.75)

    # ids_restore[b, n] is the position of patch n in the shuffled order, so the visible patches (mask == 0)
    # are exactly the first len_keep positions of that order, which x_kept contains.
    for b in range(4):
        visible = x[b][mask[b] == 0]
        assert visible.shape == (4, 6)
        assert torch.equal(x_kept[b][ids_restore[b][mask[b] == 0]], visible)

    # The decoder's unshuffle: append the removed tokens in shuffle order and gather with ids_restore.
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    removed = torch.gather(x, 1, ids_shuffle[:, 4:].unsqueeze(-1).expand(-1, -1, 6))
    restored = torch.gather(torch.cat([x_kept, removed], dim=1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, 6))
    assert torch.equal(restored, x)


def test_random_masking_differs_per_sample():
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.randn(8, 16, 2), 0.5)
    assert len({tuple(row.tolist()) for row in mask}) > 1


def test_random_masking_generator_reproducible():
    x = torch.randn(3, 16, 2)
    first = random_masking(x, 0.5, generator=torch.Generator().manual_seed(7))
    second = random_masking(x, 0.5, generator=torch.Generator().manual_seed(7))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Patchify and loss


def test_patchify_layout():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    # Patch 4 is grid row 1, column 1; its values are in (row, column, channel) order.
    expected = images[:, :, 8:16, 8:16].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(patches[:, 4], expected)


def test_unpatchify_round_trip_non_square():
    images = torch.randn(2, 1, 12, 20)
    patches = patchify(images, (4, 5))
    assert patches.shape == (2, 12, 20)
    assert torch.equal(unpatchify(patches, (4, 5), (3, 4), in_chans=1), images)


def test_unpatchify_square_default_grid():
    images = torch.randn(1, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(images, 4), 4), images)


def test_unpatchify_invalid_shapes():
    with pytest.raises(ValueError, match='square grid'):
        unpatchify(torch.zeros(1, 6, 48), 4)
    with pytest.raises(ValueError, match='values'):
        unpatchify(torch.zeros(1, 4, 47), 4)


def test_patchify_indivisible_image():
    with pytest.raises(ValueError, match='not a multiple'):
        patchify(torch.zeros(1, 3, 10, 16), 4)


@pytest.mark.parametrize('norm_pix_loss', [True, False])
def test_mae_loss_matches_reference(norm_pix_loss):
    torch.manual_seed(0)
    pred = torch.randn(3, 10, 12)
    target = torch.rand(3, 10, 12) * 4
    _, mask, _ = random_masking(torch.zeros(3, 10, 1), 0.6)

    loss = mae_loss(pred, target, mask, norm_pix_loss=norm_pix_loss)
    assert loss.dtype == torch.float32
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(reference_mae_loss(pred, target, mask, norm_pix_loss), rel=1e-5)


def test_mae_loss_norm_pix_changes_value():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 12), torch.rand(2, 4, 12) * 3
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    assert mae_loss(pred, target, mask, norm_pix_loss=True) != mae_loss(pred, target, mask, norm_pix_loss=False)


def test_mae_loss_ignores_visible_patches():
    target = torch.rand(1, 4, 12)
    pred = target.clone()
    pred[0, 0] += 100.0  # a visible patch
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert mae_loss(pred, target, mask, norm_pix_loss=False).item() == 0.0


def test_mae_loss_low_precision_inputs_fp32():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 12), torch.rand(2, 4, 12)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    loss = mae_loss(pred.bfloat16(), target.bfloat16(), mask.bfloat16())
    assert loss.dtype == torch.float32
    expected = reference_mae_loss(pred.bfloat16().float(), target.bfloat16().float(), mask, True)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_mae_loss_without_masked_patches_uses_all():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 12), torch.rand(2, 4, 12)
    loss = mae_loss(pred, target, torch.zeros(2, 4), norm_pix_loss=False)
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)


def test_mae_loss_shape_mismatch():
    with pytest.raises(ValueError, match='Shape mismatch'):
        mae_loss(torch.zeros(2, 4, 12), torch.zeros(2, 4, 12), torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------------------------------
# Encoder and decoder


def test_masked_encoder_224_keeps_49_plus_cls():
    torch.manual_seed(0)
    encoder = MaskedEncoder(create_encoder('vit_tiny_patch16', depth=1, embed_dim=32, num_heads=2))
    latent, mask, ids_restore = encoder(torch.randn(2, 3, 224, 224), 0.75)
    assert latent.shape == (2, 1 + 49, 32)
    assert mask.shape == (2, 196)
    assert ids_restore.shape == (2, 196)
    assert torch.equal(mask.sum(dim=1), torch.tensor([147.0, 147.0]))


def test_masked_encoder_zero_ratio_matches_timm():
    # Attention is permutation-equivariant once position embeddings are added, so with nothing masked the
    # unshuffled output equals timm's own forward_features.
    torch.manual_seed(0)
    vit = tiny_encoder().eval()
    encoder = MaskedEncoder(vit)
    images = torch.randn(2, 3, IMG, IMG)
    latent, mask, ids_restore = encoder(images, 0.0)
    assert latent.shape == (2, 1 + NUM_PATCHES, 32)
    assert mask.sum() == 0

    expected = vit.forward_features(images)
    unshuffled = torch.gather(latent[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(latent[:, 0], expected[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unshuffled, expected[:, 1:], atol=1e-5, rtol=1e-5)


def test_masked_encoder_rejects_patch_dropout():
    with pytest.raises(ValueError, match='patch_drop_rate'):
        MaskedEncoder(tiny_encoder(patch_drop_rate=0.1))


def test_masked_encoder_rejects_fc_norm():
    with pytest.raises(ValueError, match='fc_norm=False'):
        MaskedEncoder(tiny_encoder(global_pool='avg'))
    assert isinstance(MaskedEncoder(tiny_encoder(global_pool='avg', fc_norm=False)).vit.norm, torch.nn.LayerNorm)


def test_masked_encoder_rejects_non_vit():
    with pytest.raises(TypeError, match='VisionTransformer'):
        MaskedEncoder(torch.nn.Linear(2, 2))


def test_decoder_parameter_names_match_mae():
    decoder = MAEDecoder((4, 4), 8, 3, 32, decoder_dim=16, depth=2, num_heads=2)
    names = {name.split('.')[0] for name, _ in decoder.named_parameters()}
    assert names == {
        'mask_token',
        'decoder_pos_embed',
        'decoder_embed',
        'decoder_blocks',
        'decoder_norm',
        'decoder_pred',
    }
    assert 'decoder_blocks.1.attn.qkv.bias' in dict(decoder.named_parameters())
    assert decoder.decoder_pred.out_features == 8 * 8 * 3
    assert decoder.decoder_norm.eps == 1e-6


def test_decoder_pos_embed_fixed():
    decoder = MAEDecoder((3, 5), 4, 3, 32, decoder_dim=16, depth=1, num_heads=2)
    assert not decoder.decoder_pos_embed.requires_grad
    expected = get_2d_sincos_pos_embed(16, (3, 5), cls_token=True)
    torch.testing.assert_close(decoder.decoder_pos_embed.detach()[0], expected)


def test_decoder_forward_shape():
    torch.manual_seed(0)
    decoder = MAEDecoder((4, 4), 8, 3, 32, decoder_dim=16, depth=1, num_heads=2)
    _, _, ids_restore = random_masking(torch.zeros(2, 16, 1), 0.75)
    pred = decoder(torch.randn(2, 1 + 4, 32), ids_restore)
    assert pred.shape == (2, 16, 192)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'decoder_dim': 18}, 'multiple of 4'),
        ({'decoder_dim': 16, 'num_heads': 3}, 'divisible'),
        ({'depth': -1}, '>= 0'),
    ],
)
def test_decoder_invalid_config(kwargs, message):
    options = {'decoder_dim': 16, 'depth': 1, 'num_heads': 2}
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MAEDecoder((4, 4), 8, 3, 32, **options)


# ---------------------------------------------------------------------------------------------------------------
# MAEModel


def test_mae_model_children_and_fsdp_fns():
    model = tiny_mae()
    assert [name for name, _ in model.named_children()] == ['encoder', 'decoder']
    for child, depth in ((model.encoder, 2), (model.decoder, 1)):
        selected = [m for m in child.modules() if child.fsdp_wrap_fn(m)]
        checkpointed = [m for m in child.modules() if child.activation_checkpointing_fn(m)]
        assert len(selected) == depth
        assert all(isinstance(m, Block) for m in selected)
        assert checkpointed == selected
    assert not model.encoder.fsdp_wrap_fn(model.encoder.vit.patch_embed)
    assert model.get_metrics(is_train=True) == {}


@pytest.mark.parametrize('num_views', [1, 2])
def test_mae_model_forward_backward(num_views):
    model = tiny_mae()
    batch_size = 3
    if num_views == 1:
        batch = {'image': torch.randn(batch_size, 3, IMG, IMG)}
    else:
        batch = {f'view{i}': torch.randn(batch_size, 3, IMG, IMG) for i in range(num_views)}
    batch['label'] = torch.zeros(batch_size, dtype=torch.int64)
    batch['index'] = torch.arange(batch_size)

    outputs = model(batch)
    total = num_views * batch_size
    assert outputs['pred'].shape == (total, NUM_PATCHES, PATCH * PATCH * 3)
    assert outputs['target'].shape == (total, NUM_PATCHES, PATCH * PATCH * 3)
    assert outputs['mask'].shape == (total, NUM_PATCHES)
    assert torch.equal(outputs['mask'].sum(dim=1), torch.full((total,), 12.0))

    loss = model.loss(outputs, batch)
    assert loss.dtype == torch.float32
    assert loss.ndim == 0
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
        else:
            assert name in ('encoder.vit.pos_embed', 'decoder.decoder_pos_embed')


def test_mae_model_views_in_order():
    model = tiny_mae()
    view0, view1 = torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, IMG, IMG)
    target = model({'view1': view1, 'view0': view0})['target']
    assert torch.equal(target[:2], patchify(view0, PATCH))
    assert torch.equal(target[2:], patchify(view1, PATCH))


def test_mae_model_target_is_raw_pixels():
    model = tiny_mae(norm_pix_loss=True)
    images = torch.randn(2, 3, IMG, IMG)
    assert torch.equal(model(images)['target'], patchify(images, PATCH))


@pytest.mark.parametrize(
    ('batch', 'error', 'message'),
    [
        ({'label': torch.zeros(2)}, KeyError, "no 'image' or 'view0'"),
        ({'image': torch.randn(2, 3, 16, 16)}, ValueError, 'img_size'),
        ({'image': torch.randn(2, 1, IMG, IMG)}, ValueError, r'\[B, 3, 32, 32\]'),
        ({'image': torch.randn(2, 3, IMG, IMG), 'view0': torch.randn(2, 3, IMG, IMG)}, ValueError, 'both'),
        ({'view0': torch.randn(2, 3, IMG, IMG), 'view2': torch.randn(2, 3, IMG, IMG)}, ValueError, 'consecutive'),
        ([torch.randn(2, 3, IMG, IMG)], TypeError, 'dict batch'),
    ],
)
def test_mae_model_invalid_batch(batch, error, message):
    model = tiny_mae()
    with pytest.raises(error, match=message):
        model(batch)


def test_mae_model_invalid_mask_ratio():
    with pytest.raises(ValueError, match='mask_ratio'):
        tiny_mae(mask_ratio=1.0)


def test_mae_model_zero_mask_ratio_trains():
    model = tiny_mae(mask_ratio=0.0)
    outputs = model({'image': torch.randn(2, 3, IMG, IMG)})
    assert outputs['mask'].sum() == 0
    loss = model.loss(outputs, None)
    assert torch.isfinite(loss)
    loss.backward()


def test_flops_per_batch_hand_count():
    model = tiny_mae(mask_ratio=0.75)
    # Tiny config: N = 16 patches of 8*8*3 = 192 values, D = 32, MLP 128, 2 encoder blocks on 1 + 4 tokens;
    # decoder width 16, MLP 64, 1 block on 1 + 16 tokens.
    patch_embed = 2 * 16 * 192 * 32
    enc_tokens, dim, hidden = 5, 32, 128
    enc_block = (
        2 * enc_tokens * dim * 3 * dim  # qkv
        + 2 * enc_tokens * dim * dim  # attention output projection
        + 2 * 2 * enc_tokens * dim * hidden  # fc1 and fc2
        + 2 * 2 * enc_tokens * enc_tokens * dim  # scores and attention-weighted values
    )
    decoder_embed = 2 * enc_tokens * dim * 16
    dec_tokens, dec_dim, dec_hidden = 17, 16, 64
    dec_block = (
        2 * dec_tokens * dec_dim * 3 * dec_dim
        + 2 * dec_tokens * dec_dim * dec_dim
        + 2 * 2 * dec_tokens * dec_dim * dec_hidden
        + 2 * 2 * dec_tokens * dec_tokens * dec_dim
    )
    decoder_pred = 2 * dec_tokens * dec_dim * 192
    forward = patch_embed + 2 * enc_block + decoder_embed + dec_block + decoder_pred
    assert forward == 681_280

    assert mae_forward_flops(model.encoder, model.decoder, 0.75) == forward
    one_view = {'image': torch.zeros(4, 3, IMG, IMG)}
    two_views = {'view0': torch.zeros(4, 3, IMG, IMG), 'view1': torch.zeros(4, 3, IMG, IMG)}
    assert model.flops_per_batch(one_view) == 3 * 4 * forward
    assert model.flops_per_batch(two_views) == 2 * 3 * 4 * forward
    assert isinstance(model.flops_per_batch(one_view), int)


def test_flops_base_model_scale():
    with torch.device('meta'):
        model = MAEModel(create_encoder('vit_base_patch16'))
    forward = mae_forward_flops(model.encoder, model.decoder, 0.75)
    # Estimate: the ViT-B/16 encoder on 50 tokens costs about 2 * 85M params * 50 tokens = 8.5 GFLOPs, and the
    # 8-block, 512-wide decoder (25M params) on 197 tokens about 2 * 25M * 197 = 9.9 GFLOPs.
    assert 15e9 < forward < 25e9


class _ImageDataset(Dataset):
    def __init__(self, num_samples: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(num_samples, 3, IMG, IMG, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {'image': self.images[index], 'label': index % 2, 'index': index}


def test_mae_model_trains_with_speed_monitor():
    model = tiny_mae()
    in_memory = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(_ImageDataset(12), batch_size=4),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        max_duration='3ba',
        device='cpu',
        precision='fp32',
        callbacks=[SpeedMonitor(window_size=2)],
        loggers=[in_memory],
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    losses = [float(value) for _, value in in_memory.data['loss/train/total']]
    assert len(losses) == 3
    assert all(math.isfinite(loss) for loss in losses)
    flops_per_sec = [float(value) for _, value in in_memory.data['throughput/flops_per_sec']]
    assert flops_per_sec
    assert all(value > 0 for value in flops_per_sec)


@pytest.mark.filterwarnings('ignore:FSDP2 Config/APIs are experimental:UserWarning')
def test_mae_model_fsdp2_wraps_blocks(single_rank_group):
    # FSDP2 runs on CPU.
    model = tiny_mae()
    in_memory = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(_ImageDataset(8), batch_size=4),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        max_duration='2ba',
        device='cpu',
        parallelism_config={'fsdp': FSDP2Config(activation_checkpointing=True)},
        loggers=[in_memory],
        progress_bar=False,
        log_to_console=False,
    )
    wrapped = trainer.state.model
    assert isinstance(wrapped.encoder, FSDPModule)
    assert isinstance(wrapped.decoder, FSDPModule)
    for block in [*wrapped.encoder.vit.blocks, *wrapped.decoder.decoder_blocks]:
        assert isinstance(block, CheckpointWrapper)
        assert isinstance(block._checkpoint_wrapped_module, FSDPModule)
    assert not isinstance(wrapped.encoder.vit.patch_embed, FSDPModule)

    trainer.fit()
    losses = [float(value) for _, value in in_memory.data['loss/train/total']]
    assert len(losses) == 2
    assert all(math.isfinite(loss) for loss in losses)
