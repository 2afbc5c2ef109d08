"""Weights in: every checkpoint layout that ``composer_maect.checkpoints`` reads, built here from random models.

The official layouts are written by hand from their key names. They are official MAE ``{'model': sd}`` files with and
without the decoder, timm ``.mae`` state dicts, MAE-CT ``{'state_dict': ..., 'ctor_kwargs': ...}`` files and flat EMA
dicts (``pos_embed`` without a CLS row), the MAE-CT NNCLR head with its queue buffers, and Composer's full and sharded
checkpoints with the state of its ``EMA`` algorithm.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from composer_maect.algorithms.contrastive_tuning import ContrastiveHead
from composer_maect.checkpoints import (
    check_encoder_weights,
    extract_encoder_state_dict,
    extract_head_state_dict,
    has_ema_weights,
    load_checkpoint_file,
    load_encoder_weights,
    load_head_weights,
    match_sincos_grid,
)
from composer_maect.config import InitFromConfig, ModelConfig, validate
from composer_maect.models.mae import MAEDecoder
from composer_maect.models.nnclr_head import NNCLRHead
from composer_maect.models.pos_embed import build_fixed_pos_embed, get_2d_sincos_pos_embed
from composer_maect.models.queue import NNQueue
from composer_maect.models.vit import create_encoder

REPO = Path(__file__).resolve().parents[1]

# name -> (create_encoder name, kwargs). 'small' is a 2-block toy; 'base' has the exact ViT-B/16 shapes.
SIZES = {
    'small': ('vit_tiny_patch16', {'img_size': 32, 'patch_size': 8, 'depth': 2, 'embed_dim': 64, 'num_heads': 2}),
    'base': ('vit_base_patch16', {'img_size': 224}),
}
SMALL_KWARGS = {'patch_size': 8, 'depth': 2, 'embed_dim': 64, 'num_heads': 2}


def small_encoder(img_size=32, **kwargs):
    return create_encoder('vit_tiny_patch16', img_size=img_size, **{**SMALL_KWARGS, **kwargs})


def learned_vit(img_size=32):
    """A timm ViT with a learned (trainable) position embedding and the small encoder's shapes."""
    return timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=img_size, **SMALL_KWARGS)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter except the fixed pos_embed random values, so that loads are visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != 'pos_embed' or param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=f'tensor {key} differs')


def mae_ct_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MAE-CT encoder layout: the same keys, pos_embed [1, N, D] without the CLS row."""
    return {**state, 'pos_embed': state['pos_embed'][:, 1:].clone()}


def decoder_keys(encoder) -> dict[str, torch.Tensor]:
    """Decoder keys of an official ``_full`` file: mask_token, decoder_embed, decoder_pos_embed, decoder_blocks, ..."""
    decoder = MAEDecoder(
        encoder_dim=encoder.embed_dim,
        grid_size=tuple(encoder.patch_embed.grid_size),
        patch_size=tuple(encoder.patch_embed.patch_size),
        in_chans=3,
        decoder_dim=32,
        depth=1,
        num_heads=2,
    )
    state = decoder.state_dict()
    assert 'mask_token' in state and any(key.startswith('decoder_blocks.0.') for key in state)
    return state


def composer_checkpoint(model_state, *, ema=None, ema_active=True, prefix='encoder.', extra_algorithms=()):
    """A checkpoint in the layout of Composer 0.32.1: {'state': {...}, 'rng': [...]}.

    With ``ema=(params, buffers)`` the EMA algorithm's entry is ('EMA', {'ema_model': {'named_parameters_dict',
    'named_buffers_dict'}, 'ema_weights_active', 'ema_started'}) with keys of the ComposerModel.
    """
    algorithms = list(extra_algorithms)
    if ema is not None:
        params, buffers = ema
        algorithms.append(
            (
                'EMA',
                {
                    'repr': 'EMA(smoothing=0.9999)',
                    'ema_model': {
                        'named_parameters_dict': {prefix + key: value for key, value in params.items()},
                        'named_buffers_dict': {prefix + key: value for key, value in buffers.items()},
                    },
                    'ema_weights_active': ema_active,
                    'ema_started': True,
                },
            )
        )
    return {
        'state': {
            'model': {prefix + key: value for key, value in model_state.items()},
            'algorithms': algorithms,
            'callbacks': {},
            'timestamp': {'epoch': 1, 'batch': 4},
            'run_name': 'test-run',
            'rank_zero_seed': 17,
        },
        'rng': [{'torch': torch.get_rng_state(), 'python': [3, [1, 2, 3], None]}],
    }


def raw_and_ema(encoder, seed=0):
    """Two weight sets of one encoder: raw (its weights) and EMA (trainable params shifted), frozen ones shared."""
    raw = {key: value.clone() for key, value in encoder.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    trainable = {name for name, param in encoder.named_parameters() if param.requires_grad}
    ema = {
        key: (value + torch.randn(value.shape, generator=generator) if key in trainable else value.clone())
        for key, value in raw.items()
    }
    return raw, ema, trainable


# ---------------------------------------------------------------------------------------------------------------------
# Official MAE, timm and MAE-CT layouts, at two sizes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module', params=sorted(SIZES))
def reference(request):
    """A random encoder of each size, its state dict, and a second encoder of the same shape to load into."""
    name, kwargs = SIZES[request.param]
    source = randomize(create_encoder(name, **kwargs), seed=1)
    target = create_encoder(name, **kwargs)
    return request.param, source.state_dict(), target


def load_and_compare(target, path, expected, **kwargs):
    randomize(target, seed=99)
    load_encoder_weights(target, path, **kwargs)
    assert_same_state(target, expected)


def test_official_mae_encoder_file(reference, tmp_path):
    _, state, target = reference
    assert torch.count_nonzero(state['pos_embed'][:, 0]) == 0
    torch.save({'model': state}, tmp_path / 'mae_pretrain_vit.pth')
    load_and_compare(target, tmp_path / 'mae_pretrain_vit.pth', state)


def test_official_mae_full_file_drops_decoder(reference, tmp_path):
    _, state, target = reference
    full = {**state, **decoder_keys(target)}
    torch.save({'model': full}, tmp_path / 'mae_pretrain_vit_full.pth')
    load_and_compare(target, tmp_path / 'mae_pretrain_vit_full.pth', state)


def test_timm_mae_state_dict(reference, tmp_path):
    size, state, target = reference
    # The keys of timm's .mae models are those of the official files, without the wrapper.
    if size == 'base':
        timm_keys = set(timm.create_model('vit_base_patch16_224.mae', pretrained=False).state_dict())
        assert timm_keys == set(state)
    torch.save(state, tmp_path / 'timm.pth')
    load_and_compare(target, tmp_path / 'timm.pth', state)
    save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / 'timm.safetensors')
    load_and_compare(target, tmp_path / 'timm.safetensors', state)


def test_mae_ct_file_without_cls_row(reference, tmp_path):
    size, state, target = reference
    ctor_kwargs = {'kind': 'vit.masked_encoder', 'patch_size': 8 if size == 'small' else 16, 'depth': 2}
    torch.save({'state_dict': mae_ct_layout(state), 'ctor_kwargs': ctor_kwargs}, tmp_path / 'encoder cp=last model.th')
    load_and_compare(target, tmp_path / 'encoder cp=last model.th', state)


def test_mae_ct_flat_ema_dict(reference, tmp_path):
    _, state, target = reference
    path = tmp_path / 'mae_contheads_vit.encoder cp=last ema=0.9999 model.th'
    torch.save(mae_ct_layout(state), path)
    load_and_compare(target, path, state)


def test_composer_full_checkpoint_raw_and_ema(reference, tmp_path):
    _, _, target = reference
    randomize(target, seed=5)
    raw, ema, trainable = raw_and_ema(target)
    # Composer saves with the EMA weights swapped into the model, and the training weights in the algorithm state.
    buffers = {key: value for key, value in raw.items() if key not in dict(target.named_parameters())}
    raw_params = {key: raw[key] for key in trainable}
    checkpoint = composer_checkpoint(ema, ema=(raw_params, buffers), ema_active=True)
    torch.save(checkpoint, tmp_path / 'ep1-ba4-rank0.pt')
    load_and_compare(target, tmp_path / 'ep1-ba4-rank0.pt', raw, weights='raw')
    load_and_compare(target, tmp_path / 'ep1-ba4-rank0.pt', ema, weights='ema')


# ---------------------------------------------------------------------------------------------------------------------
# Composer checkpoints: EMA state, prefixes, sharded folders
# ---------------------------------------------------------------------------------------------------------------------


def test_composer_ema_inactive_swaps_other_way(tmp_path):
    encoder = randomize(small_encoder(), seed=2)
    encoder.patch_embed.requires_grad_(False)
    raw, ema, trainable = raw_and_ema(encoder)
    assert 'patch_embed.proj.weight' not in trainable
    # ema_weights_active False: the model section has the raw weights, the algorithm state the EMA weights.
    checkpoint = composer_checkpoint(raw, ema=({key: ema[key] for key in trainable}, {}), ema_active=False)
    torch.save(checkpoint, tmp_path / 'ckpt.pt')
    target = small_encoder()
    load_and_compare(target, tmp_path / 'ckpt.pt', ema, weights='ema')
    load_and_compare(target, tmp_path / 'ckpt.pt', raw, weights='raw')
    # Frozen parameters are not averaged, so both weight sets share them.
    torch.testing.assert_close(ema['patch_embed.proj.weight'], raw['patch_embed.proj.weight'])


def test_ema_requested_without_ema_fails(tmp_path):
    state = small_encoder().state_dict()
    torch.save({'model': state}, tmp_path / 'mae.pth')
    with pytest.raises(ValueError, match=r"contains one set of weights.*weights='raw'"):
        load_encoder_weights(small_encoder(), tmp_path / 'mae.pth', weights='ema')
    torch.save(composer_checkpoint(state), tmp_path / 'composer.pt')
    with pytest.raises(ValueError, match="has none: the 'ema' algorithm was not used"):
        load_encoder_weights(small_encoder(), tmp_path / 'composer.pt', weights='ema')
    with pytest.raises(ValueError, match="Invalid weights 'best'"):
        load_encoder_weights(small_encoder(), tmp_path / 'composer.pt', weights='best')


def test_ema_not_started_counts_as_none():
    state = small_encoder().state_dict()
    checkpoint = composer_checkpoint(state, ema=({}, {}))
    assert has_ema_weights(checkpoint)
    checkpoint['state']['algorithms'][0][1]['ema_started'] = False
    assert not has_ema_weights(checkpoint)


@pytest.mark.parametrize(
    'prefix', ['encoder.', 'encoder.vit.', 'module.encoder.vit.', 'model.', 'backbone.', '_orig_mod.', 'module.']
)
def test_encoder_prefixes_stripped(prefix, tmp_path):
    source = randomize(small_encoder(), seed=3)
    state = source.state_dict()
    # Other parts of the model stored next to the ViT are ignored.
    other = {'maect_head.head.projector.0.weight': torch.zeros(2, 2), 'decoder.decoder_embed.weight': torch.zeros(2)}
    torch.save({'state_dict': {**{prefix + key: value for key, value in state.items()}, **other}}, tmp_path / 'w.pth')
    load_and_compare(small_encoder(), tmp_path / 'w.pth', state)


def test_fsdp_wrapper_names_stripped():
    state = small_encoder().state_dict()
    wrapped = {f'encoder._fsdp_wrapped_module.{key}': value for key, value in state.items()}
    assert sorted(extract_encoder_state_dict({'state': {'model': wrapped}})) == sorted(state)


def test_mae_ct_composite_nested_file(tmp_path):
    """MAE-CT's 'single' save mode nests each submodel's state dict: {'model': {'encoder': ..., 'head.nnclr': ...}}."""
    source = randomize(small_encoder(), seed=4)
    head = official_head(source.embed_dim)
    checkpoint = {
        'model': {'encoder': mae_ct_layout(source.state_dict()), 'head.nnclr': head},
        'model_ctor_kwargs': {'kind': 'mae_contheads_vit'},
    }
    torch.save(checkpoint, tmp_path / 'last.th')
    load_and_compare(small_encoder(), tmp_path / 'last.th', source.state_dict())
    module = contrastive_head(source.embed_dim)
    load_head_weights(module, tmp_path / 'last.th')
    torch.testing.assert_close(module.queue.queue, head['queue'])


def save_sharded(checkpoint: dict, folder: Path) -> None:
    """Write ``checkpoint`` as a sharded checkpoint (.metadata and __0_0.distcp) in one process, no process group."""
    import torch.distributed.checkpoint as dcp

    dcp.save(checkpoint, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)


def test_composer_sharded_checkpoint(tmp_path):
    encoder = randomize(small_encoder(), seed=6)
    raw, ema, trainable = raw_and_ema(encoder)
    buffers = {key: value for key, value in raw.items() if key not in dict(encoder.named_parameters())}
    checkpoint = composer_checkpoint(ema, ema=({key: raw[key] for key in trainable}, buffers), ema_active=True)
    checkpoint['state']['optimizers'] = {'AdamW': {'state': {'encoder.cls_token': {'exp_avg': torch.ones(3)}}}}
    folder = tmp_path / 'ep1-ba4'
    save_sharded(checkpoint, folder)
    assert (folder / '.metadata').is_file()
    assert list(folder.glob('__*_0.distcp'))

    loaded = load_checkpoint_file(folder)
    assert set(loaded['state']) == {'model', 'algorithms'}
    assert has_ema_weights(loaded)
    target = small_encoder()
    load_and_compare(target, folder, ema, weights='ema')
    load_and_compare(target, folder, raw, weights='raw')
    # Composer's 'latest' link to the folder and the .metadata file itself name the same checkpoint.
    (tmp_path / 'latest-rank0.pt').symlink_to(folder)
    load_and_compare(target, tmp_path / 'latest-rank0.pt', ema, weights='ema')
    load_and_compare(target, folder / '.metadata', raw, weights='raw')


def test_sharded_checkpoint_with_pickled_object_rejected(tmp_path):
    folder = tmp_path / 'ckpt'
    checkpoint = composer_checkpoint(small_encoder().state_dict(), extra_algorithms=[('Custom', {'obj': Custom()})])
    save_sharded(checkpoint, folder)
    with pytest.raises(ValueError, match=r'Custom.*arbitrary code'):
        load_checkpoint_file(folder)


def test_folder_without_metadata_rejected(tmp_path):
    with pytest.raises(ValueError, match=r'has no \.metadata file'):
        load_checkpoint_file(tmp_path)


def test_composer_trainer_checkpoint_with_ema(tmp_path):
    """A checkpoint that Composer's Trainer writes with the EMA algorithm gives both weight sets."""
    from composer import Trainer
    from composer.algorithms import EMA
    from composer.models import ComposerModel
    from torch.utils.data import DataLoader, TensorDataset

    class Model(ComposerModel):
        def __init__(self):
            super().__init__()
            self.encoder = small_encoder()
            self.encoder.patch_embed.requires_grad_(False)

        def forward(self, batch):
            return self.encoder.forward_features(batch[0])

        def loss(self, outputs, batch):
            return outputs.pow(2).mean()

    torch.manual_seed(0)
    model = Model()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8)), batch_size=4),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
        max_duration='2ba',
        device='cpu',
        algorithms=[EMA(half_life=None, smoothing=0.5, update_interval='1ba')],
        save_folder=str(tmp_path),
        save_interval='2ba',
        save_filename='ep{epoch}-ba{batch}-rank{rank}.pt',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    ema_algorithm = trainer.state.algorithms[0]
    # After the checkpoint event the model contains the EMA weights and the algorithm the training weights.
    assert ema_algorithm.ema_weights_active
    ema = {key: value.clone() for key, value in model.encoder.state_dict().items()}
    training = {key: value.clone() for key, value in ema_algorithm.ema_model.named_parameters_dict.items()}
    trainer.close()

    raw = {key: training.get(f'encoder.{key}', value) for key, value in ema.items()}
    assert 'encoder.patch_embed.proj.weight' not in training
    assert not torch.equal(raw['blocks.0.attn.qkv.weight'], ema['blocks.0.attn.qkv.weight'])
    target = small_encoder()
    load_and_compare(target, tmp_path / 'latest-rank0.pt', ema, weights='ema')
    load_and_compare(target, tmp_path / 'latest-rank0.pt', raw, weights='raw')


# ---------------------------------------------------------------------------------------------------------------------
# Strict matching, patch size, pickles
# ---------------------------------------------------------------------------------------------------------------------


def test_strict_match_failure_lists_keys(tmp_path):
    state = small_encoder().state_dict()
    del state['blocks.1.mlp.fc2.bias']
    state['blocks.0.attn.q_norm.weight'] = torch.ones(32)
    state['norm.weight'] = torch.ones(48)
    torch.save({'model': state}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError) as error:
        load_encoder_weights(small_encoder(), tmp_path / 'bad.pth')
    message = str(error.value)
    total = len(small_encoder().state_dict())
    assert f'{total - 2} of {total} tensors match' in message
    assert "1 missing keys ['blocks.1.mlp.fc2.bias']" in message
    assert "1 unexpected keys ['blocks.0.attn.q_norm.weight']" in message
    assert 'norm.weight: (48,) in the file, (64,) in the model' in message
    assert 'bad.pth' in message


def test_strict_match_failure_leaves_model_unchanged(tmp_path):
    state = small_encoder().state_dict()
    del state['norm.bias']
    torch.save(state, tmp_path / 'bad.pth')
    target = randomize(small_encoder(), seed=8)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ValueError, match='missing keys'):
        load_encoder_weights(target, tmp_path / 'bad.pth')
    assert_same_state(target, before)


def test_wrong_depth_fails(tmp_path):
    torch.save({'model': small_encoder(depth=3).state_dict()}, tmp_path / 'deep.pth')
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.2"):
        load_encoder_weights(small_encoder(), tmp_path / 'deep.pth')


def test_patch_size_mismatch_names_both(tmp_path):
    torch.save({'model': small_encoder(patch_size=4).state_dict()}, tmp_path / 'p4.pth')
    with pytest.raises(ValueError, match=r'has patch size 4x4, but the encoder has patch size 8x8.*patch_size=4'):
        load_encoder_weights(small_encoder(), tmp_path / 'p4.pth')


def test_no_vit_in_checkpoint(tmp_path):
    torch.save({'model': {'fc.weight': torch.zeros(2, 2)}}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match=r"No ViT weights found.*'fc\.weight'"):
        load_encoder_weights(small_encoder(), tmp_path / 'other.pth')


@pytest.mark.parametrize('content', [b'not a checkpoint', b'PK\x03\x04' + b'\0' * 64])
def test_unreadable_file(content, tmp_path):
    (tmp_path / 'broken.pth').write_bytes(content)
    with pytest.raises(ValueError, match=r'could not be read by torch\.load'):
        load_encoder_weights(small_encoder(), tmp_path / 'broken.pth')


def test_invalid_safetensors_file(tmp_path):
    (tmp_path / 'broken.safetensors').write_bytes(b'xx')
    with pytest.raises(ValueError, match='is invalid'):
        load_encoder_weights(small_encoder(), tmp_path / 'broken.safetensors')


def test_truncated_file(tmp_path):
    torch.save({'model': small_encoder().state_dict()}, tmp_path / 'full.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'full.pth').read_bytes()[:5000])
    with pytest.raises(ValueError, match='Check that the file is complete'):
        load_encoder_weights(small_encoder(), tmp_path / 'cut.pth')


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'):
        load_encoder_weights(small_encoder(), tmp_path / 'missing.pth')


class Custom:
    """A class that ``torch.load(weights_only=True)`` must not instantiate."""

    def __init__(self):
        self.value = 1


def test_pickled_object_rejected(tmp_path):
    torch.save({'model': small_encoder().state_dict(), 'args': Custom()}, tmp_path / 'pickled.pth')
    with pytest.raises(ValueError) as error:
        load_encoder_weights(small_encoder(), tmp_path / 'pickled.pth')
    message = str(error.value)
    assert 'Custom' in message
    assert 'arbitrary code' in message
    assert 'weights_only=False' in message


def test_composer_allowlisted_types_load(tmp_path):
    """Composer checkpoints contain a timedelta, the torch version and NumPy RNG states; these load."""
    import datetime

    import numpy as np

    checkpoint = composer_checkpoint(small_encoder().state_dict())
    checkpoint['state']['timestamp']['total_wct'] = datetime.timedelta(seconds=3)
    checkpoint['state']['metadata'] = {'torch_version': torch.__version__}
    checkpoint['rng'][0]['numpy'] = np.random.get_state()
    torch.save(checkpoint, tmp_path / 'composer.pt')
    load_encoder_weights(small_encoder(), tmp_path / 'composer.pt')


# ---------------------------------------------------------------------------------------------------------------------
# Position embeddings
# ---------------------------------------------------------------------------------------------------------------------


def interpolated(table_patch_rows: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Reference: bicubic, antialiased F.interpolate of the rows ``[1, N, D]`` laid out on the grid."""
    dim = table_patch_rows.shape[-1]
    grid = table_patch_rows.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=new_grid, mode='bicubic', antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim)


# (file image size, model image size): a larger grid, a smaller one, a non-square one, and a non-square grid with the
# same token count (16 patches as 4x4 and as 2x8).
GRID_CASES = [(32, 48), (48, 32), (32, (32, 64)), (32, (16, 64)), ((16, 64), 32)]


@pytest.mark.parametrize(('file_size', 'model_size'), GRID_CASES)
def test_learned_pos_embed_resampled(file_size, model_size, tmp_path):
    source = randomize(learned_vit(file_size), seed=10)
    state = source.state_dict()
    torch.save(state, tmp_path / 'learned.pth')
    target = learned_vit(model_size)
    load_encoder_weights(target, tmp_path / 'learned.pth')

    # A learned table stores no grid: a square token count is read as a square grid.
    tokens = state['pos_embed'].shape[1] - 1
    old_grid, new_grid = (math.isqrt(tokens), math.isqrt(tokens)), tuple(target.patch_embed.grid_size)
    if old_grid == new_grid:
        torch.testing.assert_close(target.pos_embed, state['pos_embed'], rtol=0, atol=0)
    else:
        expected = interpolated(state['pos_embed'][:, 1:], old_grid, new_grid)
        torch.testing.assert_close(target.pos_embed[:, 1:], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.pos_embed[:, :1], state['pos_embed'][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize(('file_size', 'model_size'), GRID_CASES)
def test_sincos_pos_embed_rebuilt_for_grid(file_size, model_size, tmp_path):
    source = randomize(small_encoder(file_size), seed=11)
    torch.save({'model': source.state_dict()}, tmp_path / 'mae.pth')
    target = small_encoder(model_size)
    load_encoder_weights(target, tmp_path / 'mae.pth')
    grid = tuple(target.patch_embed.grid_size)
    exact = build_fixed_pos_embed(64, grid)
    torch.testing.assert_close(target.pos_embed, exact, rtol=0, atol=0)
    assert not target.pos_embed.requires_grad
    torch.testing.assert_close(target.cls_token, source.cls_token)


def test_sincos_table_into_learned_model_is_exact(tmp_path):
    """The rule 'a fixed table is rebuilt, a learned table is resampled' holds for trainable tables too."""
    torch.save({'model': small_encoder(32).state_dict()}, tmp_path / 'mae.pth')
    target = learned_vit(48)
    load_encoder_weights(target, tmp_path / 'mae.pth')
    torch.testing.assert_close(target.pos_embed, build_fixed_pos_embed(64, (6, 6)), rtol=0, atol=0)


def test_mae_ct_table_into_other_grid(tmp_path):
    source = randomize(small_encoder(32), seed=12)
    torch.save({'state_dict': mae_ct_layout(source.state_dict())}, tmp_path / 'maect.th')
    target = small_encoder((16, 64))
    load_encoder_weights(target, tmp_path / 'maect.th')
    torch.testing.assert_close(target.pos_embed, build_fixed_pos_embed(64, (2, 8)), rtol=0, atol=0)


def test_nonzero_cls_row_added_into_cls_token(tmp_path):
    """A learned CLS row moves into cls_token for a frozen table, which leaves the features unchanged."""
    source = randomize(learned_vit(32), seed=13)
    with torch.no_grad():
        source.pos_embed.copy_(build_fixed_pos_embed(64, (4, 4)))
        source.pos_embed[:, 0] = torch.linspace(-1, 1, 64)
    torch.save({'model': source.state_dict()}, tmp_path / 'fair.pth')
    target = small_encoder(32)
    load_encoder_weights(target, tmp_path / 'fair.pth')
    assert torch.count_nonzero(target.pos_embed[:, 0]) == 0
    torch.testing.assert_close(target.cls_token, source.cls_token + source.pos_embed[:, :1])
    images = torch.randn(2, 3, 32, 32)
    source.eval(), target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(images), source.forward_features(images))


def test_learned_cls_row_kept_for_learned_table(tmp_path):
    source = randomize(learned_vit(32), seed=14)
    torch.save(source.state_dict(), tmp_path / 'learned.pth')
    target = learned_vit(32)
    load_encoder_weights(target, tmp_path / 'learned.pth')
    assert_same_state(target, source.state_dict())


def test_match_sincos_grid_finds_non_square():
    assert match_sincos_grid(get_2d_sincos_pos_embed(64, (2, 8))) == (2, 8)
    assert match_sincos_grid(get_2d_sincos_pos_embed(64, (4, 4))) == (4, 4)
    assert match_sincos_grid(get_2d_sincos_pos_embed(64, (4, 4)).to(torch.bfloat16)) == (4, 4)
    assert match_sincos_grid(torch.randn(16, 64)) is None


def test_unknown_learned_grid_fails(tmp_path):
    # A learned table of a non-square grid (2x3 = 6 patches) into a model with another token count.
    source = learned_vit((16, 24))
    torch.save(source.state_dict(), tmp_path / 'odd.pth')
    with pytest.raises(ValueError, match='Cannot tell the patch grid of a learned pos_embed with 7 rows'):
        load_encoder_weights(learned_vit(32), tmp_path / 'odd.pth')


# ---------------------------------------------------------------------------------------------------------------------
# NNCLR head and queue
# ---------------------------------------------------------------------------------------------------------------------


HEAD_DIMS = {'proj_hidden_dim': 32, 'pred_hidden_dim': 48, 'out_dim': 16}


def contrastive_head(in_dim=64, target_momentum=0.99, queue_size=8) -> ContrastiveHead:
    return ContrastiveHead(
        NNCLRHead(in_dim, target_momentum=target_momentum, **HEAD_DIMS), NNQueue(queue_size, HEAD_DIMS['out_dim'])
    )


def official_head(in_dim=64, *, with_target=True, queue_size=8, seed=20) -> dict[str, torch.Tensor]:
    """The state dict of MAE-CT's NNCLR queue head: projector, predictor, target_projector and the queue buffers."""
    torch.manual_seed(seed)
    head = NNCLRHead(in_dim, target_momentum=0.99 if with_target else None, **HEAD_DIMS)
    state = {
        key: torch.randn_like(value) if value.is_floating_point() else value for key, value in head.state_dict().items()
    }
    state.update(
        queue=F.normalize(torch.randn(queue_size, HEAD_DIMS['out_dim']), dim=1),
        queue_y=torch.tensor([3, 1, 4, 1, 5, -1, -1, -1]),
        queue_id=torch.tensor([10, 11, 12, 13, 14, -1, -1, -1]),
        queue_ptr=torch.tensor([5]),
    )
    return state


def test_official_head_with_queue(tmp_path):
    state = official_head()
    torch.save({'state_dict': state, 'ctor_kwargs': {'kind': 'nnclr_ema_queue_head'}}, tmp_path / 'head.th')
    module = contrastive_head()
    load_head_weights(module, tmp_path / 'head.th')
    torch.testing.assert_close(module.head.projector[0].weight, state['projector.0.weight'])
    torch.testing.assert_close(module.head.projector[7].running_var, state['projector.7.running_var'])
    torch.testing.assert_close(module.head.predictor[3].weight, state['predictor.3.weight'])
    torch.testing.assert_close(module.head.target_projector[6].weight, state['target_projector.6.weight'])
    torch.testing.assert_close(module.queue.queue, state['queue'])
    assert module.queue.queue_labels.tolist() == state['queue_y'].tolist()
    assert module.queue.queue_ids.tolist() == state['queue_id'].tolist()
    assert module.queue.queue_ptr.tolist() == [5]
    assert module.queue.num_filled.tolist() == [5]


def test_official_head_without_target_copies_projector(tmp_path):
    state = official_head(with_target=False)
    assert not any(key.startswith('target_projector.') for key in state)
    torch.save(state, tmp_path / 'head.th')
    module = contrastive_head()
    load_head_weights(module, tmp_path / 'head.th')
    torch.testing.assert_close(module.head.target_projector[0].weight, state['projector.0.weight'])
    assert module.head.target_projector[0].weight.data_ptr() != module.head.projector[0].weight.data_ptr()


def test_head_without_target_ignores_saved_target(tmp_path):
    torch.save(official_head(), tmp_path / 'head.th')
    module = contrastive_head(target_momentum=None)
    load_head_weights(module, tmp_path / 'head.th')
    assert module.head.target_projector is None


def test_bare_nnclr_head_ignores_queue(tmp_path):
    state = official_head()
    torch.save(state, tmp_path / 'head.th')
    head = NNCLRHead(64, target_momentum=0.99, **HEAD_DIMS)
    load_head_weights(head, tmp_path / 'head.th')
    torch.testing.assert_close(head.predictor[0].weight, state['predictor.0.weight'])


def test_head_from_composer_checkpoint(tmp_path):
    source = contrastive_head()
    with torch.no_grad():
        for value in source.state_dict().values():
            if value.is_floating_point():
                value.normal_()
        source.queue.queue_ptr.fill_(3)
        source.queue.num_filled.fill_(7)
    encoder_state = {f'encoder.{key}': value for key, value in small_encoder().state_dict().items()}
    model_state = {**encoder_state, **{f'maect_head.{key}': value for key, value in source.state_dict().items()}}
    torch.save(composer_checkpoint(model_state, prefix=''), tmp_path / 'ckpt.pt')
    module = contrastive_head()
    load_head_weights(module, tmp_path / 'ckpt.pt')
    assert_same_state(module, source.state_dict())


def test_head_queue_size_mismatch_fails(tmp_path):
    torch.save(official_head(queue_size=8), tmp_path / 'head.th')
    with pytest.raises(ValueError, match=r'queue.queue: \(8, 16\) in the file, \(16, 16\) in the model.*queue_size'):
        load_head_weights(contrastive_head(queue_size=16), tmp_path / 'head.th')


def test_head_missing_fails(tmp_path):
    torch.save({'model': small_encoder().state_dict()}, tmp_path / 'encoder.pth')
    with pytest.raises(ValueError, match='No NNCLR head weights found'):
        load_head_weights(contrastive_head(), tmp_path / 'encoder.pth')


def test_extract_head_keys_official_to_package_layout():
    state = extract_head_state_dict(
        {'state_dict': {f'contrastive_heads.nnclr.{k}': v for k, v in official_head().items()}}
    )
    assert {'queue.queue', 'queue.queue_labels', 'queue.queue_ids', 'queue.queue_ptr'} <= set(state)
    assert 'head.target_projector.0.weight' in state
    assert 'head.predictor.3.weight' in state


# ---------------------------------------------------------------------------------------------------------------------
# YAML and dry run
# ---------------------------------------------------------------------------------------------------------------------


def test_init_from_weights_key_validated():
    cfg = validate(
        {'encoder': {'name': 'vit_base_patch16'}, 'init_from': {'path': 'x.pt', 'weights': 'ema'}}, ModelConfig
    )
    assert cfg.init_from == InitFromConfig(path='x.pt', weights='ema')
    assert (
        validate(
            {'encoder': {'name': 'vit_base_patch16'}, 'init_from': {'path': 'x.pt'}}, ModelConfig
        ).init_from.weights
        == 'raw'
    )
    with pytest.raises(ValueError, match='weights'):
        validate(
            {'encoder': {'name': 'vit_base_patch16'}, 'init_from': {'path': 'x.pt', 'weights': 'best'}}, ModelConfig
        )


def test_build_model_loads_init_from_ema(tmp_path):
    from composer_maect.train import build_model

    encoder = randomize(small_encoder(), seed=30)
    raw, ema, trainable = raw_and_ema(encoder)
    torch.save(
        composer_checkpoint(ema, ema=({key: raw[key] for key in trainable}, {}), ema_active=True), tmp_path / 'c.pt'
    )
    section = {
        'name': 'vit_encoder',
        'encoder': {
            'name': 'vit_tiny_patch16',
            'img_size': 32,
            'patch_size': 8,
            'timm_kwargs': {'depth': 2, 'embed_dim': 64, 'num_heads': 2},
        },
        'init_from': {'path': str(tmp_path / 'c.pt'), 'weights': 'raw'},
    }
    model = build_model(validate(section, ModelConfig))
    assert_same_state(model.encoder, raw)


def synthetic_vith14_file(path: Path) -> None:
    """Write an official MAE ViT-H/14 encoder file ({'model': sd}, exact keys and shapes) of about 30 MB.

    Every tensor is a view of one shared zero storage, and torch.save writes a shared storage once.
    """
    with torch.device('meta'):
        reference = timm.create_model('vit_huge_patch14_224', num_classes=0)
    shapes = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    storage = torch.zeros(max(math.prod(shape) for shape in shapes.values()))
    state = {key: storage[: math.prod(shape)].view(shape) for key, shape in shapes.items()}
    # Keep the official layout's fixed sin-cos table with its zero CLS row.
    state['pos_embed'] = build_fixed_pos_embed(1280, (16, 16)).detach()
    torch.save({'model': state}, path)


def test_synthetic_vith14_checks_against_meta_encoder(tmp_path):
    path = tmp_path / 'mae_pretrain_vit_huge.pth'
    synthetic_vith14_file(path)
    assert path.stat().st_size < 64 * 2**20
    with torch.device('meta'):
        encoder = create_encoder('vit_huge_patch14', img_size=224)
    summary = check_encoder_weights(encoder, path)
    assert summary.startswith(f'{len(encoder.state_dict())} encoder tensors match')
    with torch.device('meta'):
        other = create_encoder('vit_huge_patch16', img_size=224)
    with pytest.raises(ValueError, match='patch size 14x14, but the encoder has patch size 16x16'):
        check_encoder_weights(other, path)


def test_vith_yaml_dry_run_with_synthetic_checkpoint(tmp_path):
    path = tmp_path / 'mae_pretrain_vit_huge.pth'
    synthetic_vith14_file(path)
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'composer_maect.train',
            str(REPO / 'yamls' / 'mae_ct_vith.yaml'),
            f'variables.mae_checkpoint={path}',
            f'variables.data_local={tmp_path / "data"}',
            '--dry-run',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'model.init_from {path}: 390 encoder tensors match' in result.stdout
    assert 'problem(s) would stop training' not in result.stdout


@pytest.mark.slow
def test_synthetic_vith14_loads_into_real_encoder(tmp_path):
    path = tmp_path / 'mae_pretrain_vit_huge.pth'
    synthetic_vith14_file(path)
    encoder = create_encoder('vit_huge_patch14', img_size=224)
    load_encoder_weights(encoder, path)
    assert torch.count_nonzero(encoder.blocks[31].mlp.fc2.weight) == 0


def test_contrastive_tuning_loads_head_at_init(tmp_path):
    from composer import Trainer

    from composer_maect.algorithms import ContrastiveTuning
    from composer_maect.models.encoder_model import ViTEncoderModel

    state = official_head(in_dim=192)
    torch.save({'state_dict': state, 'ctor_kwargs': {}}, tmp_path / 'head.th')
    model = ViTEncoderModel(create_encoder('vit_tiny_patch16', img_size=16, patch_size=8, depth=2))
    algorithm = ContrastiveTuning(
        queue_size=8, target_momentum=0.99, head_init_from=str(tmp_path / 'head.th'), **HEAD_DIMS
    )
    trainer = Trainer(
        model=model,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        algorithms=[algorithm],
        device='cpu',
        progress_bar=False,
    )
    head = trainer.state.model.maect_head
    torch.testing.assert_close(head.head.projector[0].weight, state['projector.0.weight'])
    torch.testing.assert_close(head.queue.queue, state['queue'])
    assert head.queue.queue_ids.tolist() == state['queue_id'].tolist()
    trainer.close()
