"""Weights out: ``python -m composer_maect.export`` writes timm safetensors that the printed call loads exactly."""

from __future__ import annotations

import logging
import runpy
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open

from composer_maect.checkpoints import load_encoder_weights, load_head_weights
from composer_maect.export import (
    HEAD_FILE,
    MODEL_FILE,
    OFFICIAL_MAE_FILE,
    SCRIPT_FILE,
    ViTArchitecture,
    export_checkpoint,
    infer_architecture,
    main,
    timm_create_model_args,
)
from composer_maect.models.pooling import pool_tokens
from composer_maect.models.pos_embed import build_fixed_pos_embed
from composer_maect.models.vit import create_encoder
from tests.test_checkpoints import (
    composer_checkpoint,
    contrastive_head,
    mae_ct_layout,
    randomize,
    raw_and_ema,
    save_sharded,
    small_encoder,
)


def features_of(encoder, images, pooling='cls'):
    encoder.eval()
    with torch.no_grad():
        return pool_tokens(encoder.forward_features(images), pooling)


def timm_features(name, kwargs, images):
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        return model(images)


def ema_checkpoint(tmp_path, encoder, *, pooling='cls', head=None):
    """A Composer checkpoint of ``encoder`` with EMA weights swapped in; returns (path, raw, ema)."""
    raw, ema, trainable = raw_and_ema(encoder)
    model_state = {f'encoder.{key}': value for key, value in ema.items()}
    if head is not None:
        model_state.update({f'maect_head.{key}': value for key, value in head.state_dict().items()})
    settings = ('ContrastiveTuning', {'settings': {'pooling': pooling, 'topk': 20, 'temperature': 0.3}})
    checkpoint = composer_checkpoint(
        model_state, prefix='', ema=({f'encoder.{key}': raw[key] for key in trainable}, {}), extra_algorithms=[settings]
    )
    path = tmp_path / 'ep3-ba30-rank0.pt'
    torch.save(checkpoint, path)
    return path, raw, ema


@pytest.mark.parametrize('pooling', ['cls', 'mean_patch'])
def test_round_trip_small_ema(pooling, tmp_path):
    encoder = randomize(small_encoder(), seed=1)
    path, _, _ = ema_checkpoint(tmp_path, encoder, pooling=pooling)
    result = export_checkpoint(path, tmp_path / 'out', num_heads=2)

    assert result.weights == 'ema'
    assert result.create_kwargs['global_pool'] == ('token' if pooling == 'cls' else 'avg')
    assert result.create_kwargs.get('fc_norm', None) is (False if pooling == 'mean_patch' else None)
    expected = small_encoder()
    load_encoder_weights(expected, path, weights='ema')
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(
        timm_features(result.model_name, result.create_kwargs, images), features_of(expected, images, pooling)
    )


def test_round_trip_vitb16_official_mae(tmp_path):
    encoder = randomize(create_encoder('vit_base_patch16', img_size=224), seed=2)
    torch.save({'model': encoder.state_dict()}, tmp_path / 'mae_pretrain_vit_base.pth')
    result = export_checkpoint(tmp_path / 'mae_pretrain_vit_base.pth', tmp_path / 'out', verify=False)

    assert result.model_name == 'vit_base_patch16_224.mae'
    assert result.architecture == ViTArchitecture(768, 12, 12, (16, 16), (14, 14))
    # Only the arguments that differ from the named model appear.
    assert set(result.create_kwargs) == {
        'pretrained',
        'pretrained_cfg_overlay',
        'num_classes',
        'global_pool',
        'img_size',
    }
    images = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(
        timm_features(result.model_name, result.create_kwargs, images), features_of(encoder, images)
    )


def test_printed_call_and_script(tmp_path, capsys):
    encoder = randomize(small_encoder(), seed=3)
    path, _, _ = ema_checkpoint(tmp_path, encoder)
    assert main([str(path), str(tmp_path / 'out'), '--num-heads', '2']) == 0
    out = capsys.readouterr().out
    assert 'timm.create_model(' in out
    # Width 64 is not a standard ViT width: a plain ViT name with every differing argument.
    assert "    'vit_base_patch16_224'," in out
    assert 'num_classes=0,' in out
    assert "global_pool='token'," in out
    for argument in ('embed_dim=64,', 'depth=2,', 'num_heads=2,', 'patch_size=8,'):
        assert argument in out
    assert f"pretrained_cfg_overlay=dict(file='{(tmp_path / 'out' / MODEL_FILE).resolve()}'" in out

    # The printed call, executed as printed, builds the exported model.
    call = out[out.index('timm.create_model(') :]
    model = eval(call, {'timm': timm})
    images = torch.randn(2, 3, 32, 32)
    reference = small_encoder()
    load_encoder_weights(reference, path, weights='ema')
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), features_of(reference, images))

    # The script beside the weights finds them by its own location, also after the folder moves.
    moved = tmp_path / 'moved'
    (tmp_path / 'out').rename(moved)
    script = subprocess.run([sys.executable, str(moved / SCRIPT_FILE)], capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr[-2000:]
    assert 'features (1, 64)' in script.stdout
    namespace = runpy.run_path(str(moved / SCRIPT_FILE))
    assert isinstance(namespace['create_model'](), timm.models.VisionTransformer)


def test_safetensors_layout_and_metadata(tmp_path):
    encoder = randomize(small_encoder(), seed=4)
    torch.save({'state_dict': mae_ct_layout(encoder.state_dict())}, tmp_path / 'encoder cp=last model.th')
    result = export_checkpoint(tmp_path / 'encoder cp=last model.th', tmp_path / 'out', num_heads=2)
    with safe_open(str(tmp_path / 'out' / MODEL_FILE), framework='pt') as file:
        keys = set(file.keys())
        metadata = file.metadata()
        pos_embed = file.get_tensor('pos_embed')
    assert keys == set(encoder.state_dict())
    assert metadata['weights'] == 'raw'
    assert metadata['timm_model'] == result.model_name
    # MAE-CT's table without a CLS row gets timm's zero CLS row.
    assert tuple(pos_embed.shape) == (1, 17, 64)
    torch.testing.assert_close(pos_embed, build_fixed_pos_embed(64, (4, 4)).detach(), rtol=0, atol=0)


def test_raw_export_without_ema_warns(tmp_path, caplog):
    encoder = randomize(small_encoder(), seed=5)
    torch.save({'model': encoder.state_dict()}, tmp_path / 'mae.pth')
    with caplog.at_level(logging.WARNING, logger='composer_maect.export'):
        result = export_checkpoint(tmp_path / 'mae.pth', tmp_path / 'out', num_heads=2)
    assert result.weights == 'raw'
    assert 'has no EMA weights, so its raw weights are exported' in caplog.text


def test_explicit_raw_weights_from_ema_checkpoint(tmp_path):
    encoder = randomize(small_encoder(), seed=6)
    path, raw, _ = ema_checkpoint(tmp_path, encoder)
    export_checkpoint(path, tmp_path / 'out', weights='raw', official_mae=True, num_heads=2)
    loaded = torch.load(tmp_path / 'out' / OFFICIAL_MAE_FILE, weights_only=True)
    assert set(loaded) == {'model'}
    for key, value in raw.items():
        torch.testing.assert_close(loaded['model'][key], value, rtol=0, atol=0, msg=key)
    # The official-layout file loads back as an official MAE file.
    target = small_encoder()
    load_encoder_weights(target, tmp_path / 'out' / OFFICIAL_MAE_FILE)


def test_with_head_round_trip(tmp_path):
    encoder = randomize(small_encoder(), seed=7)
    head = contrastive_head()
    with torch.no_grad():
        for value in head.state_dict().values():
            if value.is_floating_point():
                value.normal_()
        head.queue.queue_ids.copy_(torch.arange(8))
        head.queue.num_filled.fill_(8)
    path, _, _ = ema_checkpoint(tmp_path, encoder, head=head)
    export_checkpoint(path, tmp_path / 'out', with_head=True, num_heads=2)
    with safe_open(str(tmp_path / 'out' / HEAD_FILE), framework='pt') as file:
        assert '"topk": 20' in file.metadata()['contrastive_tuning']
    loaded = contrastive_head()
    load_head_weights(loaded, tmp_path / 'out' / HEAD_FILE)
    for key, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_with_head_missing_fails(tmp_path):
    torch.save({'model': small_encoder().state_dict()}, tmp_path / 'mae.pth')
    with pytest.raises(ValueError, match='No NNCLR head weights found'):
        export_checkpoint(tmp_path / 'mae.pth', tmp_path / 'out', with_head=True, num_heads=2)
    assert not (tmp_path / 'out').exists()


def test_sharded_checkpoint_export(tmp_path):
    encoder = randomize(small_encoder(), seed=8)
    raw, ema, trainable = raw_and_ema(encoder)
    checkpoint = composer_checkpoint(ema, ema=({key: raw[key] for key in trainable}, {}), ema_active=True)
    save_sharded(checkpoint, tmp_path / 'ep1-ba2')
    result = export_checkpoint(tmp_path / 'ep1-ba2', tmp_path / 'out', num_heads=2)
    assert result.weights == 'ema'
    images = torch.randn(2, 3, 32, 32)
    expected = small_encoder()
    load_encoder_weights(expected, tmp_path / 'ep1-ba2', weights='ema')
    torch.testing.assert_close(
        timm_features(result.model_name, result.create_kwargs, images), features_of(expected, images)
    )


def test_non_square_grid_export(tmp_path):
    encoder = randomize(small_encoder((16, 64)), seed=9)
    torch.save({'model': encoder.state_dict()}, tmp_path / 'wide.pth')
    result = export_checkpoint(tmp_path / 'wide.pth', tmp_path / 'out', num_heads=2)
    assert result.architecture.grid_size == (2, 8)
    assert result.create_kwargs['img_size'] == (16, 64)
    images = torch.randn(2, 3, 16, 64)
    torch.testing.assert_close(
        timm_features(result.model_name, result.create_kwargs, images), features_of(encoder, images)
    )


def test_existing_output_needs_overwrite(tmp_path):
    torch.save({'model': small_encoder().state_dict()}, tmp_path / 'mae.pth')
    export_checkpoint(tmp_path / 'mae.pth', tmp_path / 'out', num_heads=2, verify=False)
    with pytest.raises(FileExistsError, match='--overwrite'):
        export_checkpoint(tmp_path / 'mae.pth', tmp_path / 'out', num_heads=2)
    export_checkpoint(tmp_path / 'mae.pth', tmp_path / 'out', num_heads=2, overwrite=True, verify=False)


def test_cli_errors(tmp_path, capsys):
    state = create_encoder(
        'vit_tiny_patch16', img_size=32, patch_size=8, depth=1, embed_dim=96, num_heads=4
    ).state_dict()
    torch.save({'model': state}, tmp_path / 'w96.pth')
    assert main([str(tmp_path / 'w96.pth'), str(tmp_path / 'out')]) == 1
    assert 'width 96 is not a standard ViT width' in capsys.readouterr().err
    assert main([str(tmp_path / 'w96.pth'), str(tmp_path / 'out'), '--num-heads', '5']) == 1
    assert 'num_heads must be a positive divisor of the width 96, got 5' in capsys.readouterr().err
    assert main([str(tmp_path / 'w96.pth'), str(tmp_path / 'out'), '--num-heads', '4']) == 0
    capsys.readouterr()

    assert main([str(tmp_path / 'w96.pth'), str(tmp_path / 'out2'), '--weights', 'ema']) == 1
    assert 'contains one set of weights' in capsys.readouterr().err
    assert main([str(tmp_path / 'missing.pt'), str(tmp_path / 'out3')]) == 1
    assert 'not found' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / 'w96.pth'), str(tmp_path / 'out4'), '--weights', 'best'])


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, '-m', 'composer_maect.export', '--help'], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert '--official-mae' in result.stdout
    assert '--with-head' in result.stdout


def test_infer_architecture_vith14_shapes():
    with torch.device('meta'):
        state = timm.create_model('vit_huge_patch14_224', num_classes=0).state_dict()
    state['pos_embed'] = build_fixed_pos_embed(1280, (16, 16)).detach()
    architecture = infer_architecture(state)
    assert architecture == ViTArchitecture(1280, 32, 16, (14, 14), (16, 16))
    name, kwargs = timm_create_model_args(architecture)
    assert name == 'vit_huge_patch14_224.mae'
    assert kwargs == {'num_classes': 0, 'global_pool': 'token', 'img_size': 224}
    # ViT-H/16 is the H/14 architecture with 16x16 patches.
    h16 = ViTArchitecture(1280, 32, 16, (16, 16), (14, 14))
    assert timm_create_model_args(h16)[1]['patch_size'] == 16
