"""FSDP settings, wrapping and checkpointing of the ViT recipes, on the CPU.

FSDP1 in Composer 0.32.1 needs CUDA, so its choices are checked without running it: the settings Composer parses, the
modules the wrap and checkpoint functions select, and torch's activation-checkpoint wrapper that Composer applies.
FSDP2 runs over gloo under ``FSDP_VERSION=2 composer -n 2`` and is compared with a 1-process run.
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from composer import Trainer
from composer.utils.parallelism import FSDP2Config, FSDPConfig
from timm.models.vision_transformer import Block
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from composer_maect.algorithms import ContrastiveTuning
from composer_maect.config import ConfigError, load_run
from composer_maect.fsdp import (
    FSDP1_KEYS,
    FSDP2_KEYS,
    FSDPConfigError,
    average_gloo_gradients,
    fsdp_settings,
    fsdp_version,
)
from composer_maect.models.encoder_model import ViTEncoderModel
from composer_maect.models.vit import create_encoder
from composer_maect.train import check_config, main

from .conftest import REPO, YAMLS, composer_launcher, run_script_on_ranks

FSDP_RECIPES = sorted(path for path in YAMLS.glob('*.yaml') if 'fsdp_config:' in path.read_text())
RECIPE_SETTINGS = {
    'sharding_strategy': 'FULL_SHARD',
    'mixed_precision': 'DEFAULT',
    'use_orig_params': True,
    'activation_checkpointing': True,
    'activation_checkpointing_reentrant': False,
    'state_dict_type': 'sharded',
}


def parse_with_composer(settings: dict) -> FSDPConfig | FSDP2Config:
    """Return the config object that Composer's Trainer builds from ``parallelism_config={'fsdp': settings}``."""
    # The method does not read the trainer's state, so it runs without building a Trainer.
    parsed = Trainer._parse_parallelism_config(None, {'fsdp': settings})
    return parsed.fsdp2 if parsed.fsdp2 is not None else parsed.fsdp


# ---------------------------------------------------------------------------------------------------------------------
# fsdp_settings


def test_settings_fsdp1_reaches_composer():
    settings = fsdp_settings(RECIPE_SETTINGS, version=1)
    config = parse_with_composer(settings)
    assert isinstance(config, FSDPConfig)
    assert config.use_orig_params is True
    assert config.activation_checkpointing is True
    assert config.activation_checkpointing_reentrant is False
    assert config.sharding_strategy == 'FULL_SHARD'
    assert config.state_dict_type == 'sharded'


def test_settings_fsdp1_defaults_non_reentrant():
    settings = fsdp_settings({'activation_checkpointing': True}, version=1)
    assert settings['activation_checkpointing_reentrant'] is False
    # An explicit choice is kept.
    explicit = fsdp_settings({'activation_checkpointing_reentrant': True}, version=1)
    assert explicit['activation_checkpointing_reentrant'] is True


@pytest.mark.filterwarnings('ignore:FSDP2 Config/APIs are experimental:UserWarning')
def test_settings_fsdp2_drop_fixed_keys(monkeypatch):
    monkeypatch.setenv('FSDP_VERSION', '2')
    settings = fsdp_settings(RECIPE_SETTINGS)
    assert settings == {'mixed_precision': 'DEFAULT', 'activation_checkpointing': True, 'state_dict_type': 'sharded'}
    with warnings.catch_warnings():
        # Composer warns about every key that FSDP2 drops; none is left to drop.
        warnings.filterwarnings('error', message='.*not a settable attribute of FSDP2Config')
        config = parse_with_composer(settings)
    assert isinstance(config, FSDP2Config)
    assert config.activation_checkpointing is True
    assert config.state_dict_type == 'sharded'


def test_settings_accepted_keys():
    assert {'use_orig_params', 'sharding_strategy', 'activation_checkpointing_reentrant'} <= FSDP1_KEYS
    assert 'reshard_after_forward' not in FSDP1_KEYS
    assert {
        'reshard_after_forward',
        'activation_checkpointing',
        'activation_cpu_offload',
        'state_dict_type',
        'load_monolith_rank0_only',
        'mixed_precision',
        'verbose',
    } == FSDP2_KEYS


@pytest.mark.parametrize(
    ('version', 'settings', 'message'),
    [
        (1, {'sharding_stratgy': 'FULL_SHARD'}, 'fsdp_config.sharding_stratgy is not a setting of FSDP1'),
        (1, {'reshard_after_forward': False}, 'FSDP1 sets this through sharding_strategy'),
        (1, {'device_mesh': None}, 'fsdp_config.device_mesh is not a setting of FSDP1'),
        (1, {'use_orig_params': False}, 'Set use_orig_params: true'),
        (2, {'backward_prefetch': 'BACKWARD_PRE'}, 'fsdp_config.backward_prefetch is not a setting of FSDP2'),
        (2, {'sharding_strategy': 'SHARD_GRAD_OP'}, 'FSDP2 always runs as sharding_strategy'),
        (2, {'use_orig_params': False}, 'FSDP2 always runs as use_orig_params: True'),
        (2, {'activation_checkpointing_reentrant': True}, 'activation_checkpointing_reentrant: False'),
        (2, {'sharding_strategy': 'FULL_SHARD', 'reshard_after_forward': False}, 'contradict each other'),
        (2, {'state_dict_type': 'local'}, "fsdp_config.state_dict_type is 'local'"),
    ],
)
def test_settings_reject(version, settings, message):
    with pytest.raises(FSDPConfigError, match=re.escape(message)):
        fsdp_settings(settings, version=version)


def test_settings_error_names_switch():
    with pytest.raises(FSDPConfigError) as error:
        fsdp_settings({'limit_all_gathers': True}, version=2)
    text = str(error.value)
    assert 'unset FSDP_VERSION to use FSDP1' in text
    assert 'FSDP2 accepts: activation_checkpointing,' in text
    with pytest.raises(FSDPConfigError, match='set FSDP_VERSION=2 to use FSDP2'):
        fsdp_settings({'reshard_after_forward': True}, version=1)


def test_settings_lowercase_sharding_strategy():
    assert fsdp_settings({'sharding_strategy': 'full_shard'}, version=2) == {}


def test_version_from_environment(monkeypatch):
    monkeypatch.delenv('FSDP_VERSION', raising=False)
    assert fsdp_version() == 1
    monkeypatch.setenv('FSDP_VERSION', '2')
    assert fsdp_version() == 2
    monkeypatch.setenv('FSDP_VERSION', '1')
    assert fsdp_version() == 1


def test_check_config_rejects_fsdp_key(monkeypatch):
    monkeypatch.delenv('FSDP_VERSION', raising=False)
    (cfg,) = load_run(str(YAMLS / 'mae_pretrain_mnist.yaml'), ['fsdp_config={reshard_after_forward: false}']).phases
    with pytest.raises(ConfigError, match='reshard_after_forward is not a setting of FSDP1'):
        check_config(cfg, world_size=1, require_data=False)


def test_cli_reports_fsdp_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('FSDP_VERSION', '2')
    status = main(
        [str(YAMLS / 'mae_pretrain_mnist.yaml'), f'variables.data_root={tmp_path}', 'fsdp_config={cpu_offload: true}']
    )
    assert status == 2
    assert 'fsdp_config.cpu_offload is not a setting of FSDP2' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Recipes


def test_fsdp_recipes_found():
    names = {path.name for path in FSDP_RECIPES}
    assert {'mae_ct_vith.yaml', 'mae_ct_vitl16.yaml', 'mae_pretrain_vith16.yaml', 'mae_pretrain_vitl16.yaml'} <= names


@pytest.mark.parametrize('path', FSDP_RECIPES, ids=lambda path: path.name)
def test_recipe_fsdp_config_both_versions(path, monkeypatch):
    monkeypatch.delenv('FSDP_VERSION', raising=False)
    for cfg in load_run(str(path)).phases:
        assert cfg.fsdp_config['use_orig_params'] is True
        assert cfg.fsdp_config['activation_checkpointing_reentrant'] is False
        assert parse_with_composer(fsdp_settings(cfg.fsdp_config, version=1)).use_orig_params is True
        assert set(fsdp_settings(cfg.fsdp_config, version=2)) <= FSDP2_KEYS


@pytest.mark.parametrize('path', FSDP_RECIPES, ids=lambda path: path.name)
def test_recipe_comment_names_version(path):
    text = path.read_text()
    comment = re.search(r'((?:#[^\n]*\n)+)fsdp_config:', text)
    assert comment is not None, 'no comment above fsdp_config'
    assert comment.group(1).startswith('# FSDP1: Composer 0.32.1 builds FSDP1')
    assert 'FSDP_VERSION=2' in comment.group(1)
    assert 'use_orig_params must be true' in comment.group(1)
    # The comment and the mapping agree with what the YAML loader reads.
    assert yaml.safe_load(text)['fsdp_config']['use_orig_params'] is True


# ---------------------------------------------------------------------------------------------------------------------
# Wrapping and activation checkpointing (the functions FSDP1 and FSDP2 look up)


def tiny_vit():
    return create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=4)


def test_encoder_wrap_fn_selects_blocks():
    model = ViTEncoderModel(tiny_vit())
    encoder = model.encoder
    selected = [module for module in encoder.modules() if encoder.fsdp_wrap_fn(module)]
    checkpointed = [module for module in encoder.modules() if encoder.activation_checkpointing_fn(module)]
    assert selected == list(encoder.blocks)
    assert all(isinstance(module, Block) for module in selected)
    assert checkpointed == selected


def test_head_is_one_unit_with_buffer_queue():
    model = ViTEncoderModel(tiny_vit())
    algorithm = ContrastiveTuning(proj_hidden_dim=16, pred_hidden_dim=16, out_dim=8, queue_size=16, target_momentum=0.9)
    Trainer(
        model=model,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        algorithms=[algorithm],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    head = model.maect_head
    # Composer wraps each direct child of the model; the head has no wrap function, so it is a single unit.
    assert 'maect_head' in dict(model.named_children())
    assert not hasattr(head, 'fsdp_wrap_fn')
    assert not any(hasattr(module, '_fsdp_wrap') for module in head.modules())
    # FSDP shards parameters only: the queue is buffers, so every rank keeps all of it.
    queue_buffers = {name for name, _ in head.queue.named_buffers()}
    assert queue_buffers == {'queue', 'queue_ids', 'queue_labels', 'queue_ptr', 'num_filled'}
    assert not list(head.queue.parameters())


@pytest.mark.filterwarnings('ignore:Please specify CheckpointImpl.NO_REENTRANT:FutureWarning')
@pytest.mark.parametrize(
    ('impl', 'upper_gets_gradient'), [(CheckpointImpl.REENTRANT, False), (CheckpointImpl.NO_REENTRANT, True)]
)
def test_checkpointing_above_frozen_blocks(impl, upper_gets_gradient):
    # The wrapper that Composer's FSDP1 applies to the blocks activation_checkpointing_fn selects.
    torch.manual_seed(0)
    model = ViTEncoderModel(tiny_vit())
    vit = model.encoder
    for module in (vit.patch_embed, vit.blocks[0], vit.blocks[1]):
        module.requires_grad_(False)
    vit.cls_token.requires_grad_(False)
    vit.pos_embed.requires_grad_(False)
    apply_activation_checkpointing(
        vit,
        checkpoint_wrapper_fn=lambda module: checkpoint_wrapper(module, checkpoint_impl=impl),
        check_fn=vit.activation_checkpointing_fn,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='None of the inputs have requires_grad=True')
        vit.forward_features(torch.randn(2, 3, 32, 32)).sum().backward()
    upper = vit.blocks[3]._checkpoint_wrapped_module.attn.qkv.weight
    assert (upper.grad is not None) == upper_gets_gradient
    assert vit.norm.weight.grad is not None


def test_average_gloo_gradients_without_group():
    assert average_gloo_gradients(ViTEncoderModel(tiny_vit())) == 0


# ---------------------------------------------------------------------------------------------------------------------
# FSDP2 on two gloo ranks against one process


def run_tuning_script(out_dir: Path, num_processes: int, *extra_args: str) -> list[dict]:
    out_dir.mkdir()
    script = REPO / 'tests' / 'scripts' / 'fsdp_tuning_run.py'
    fsdp_version = '2' if num_processes > 1 else None
    run_script_on_ranks(script, out_dir, num_processes, *extra_args, fsdp_version=fsdp_version, timeout=400)
    return [torch.load(out_dir / f'rank{rank}.pt') for rank in range(num_processes)]


@pytest.fixture(scope='module')
def tuning_results(tmp_path_factory) -> tuple[dict, list[dict], Path]:
    out_dir = tmp_path_factory.mktemp('fsdp_tuning')
    (reference,) = run_tuning_script(out_dir / 'one', 1)
    return reference, run_tuning_script(out_dir / 'two', 2), out_dir / 'two'


def assert_close_to_scale(actual: dict, expected: dict, relative: float, message: str) -> None:
    """Check every tensor against ``relative`` times the largest entry of all of ``expected``."""
    scale = max(float(value.abs().max()) for value in expected.values() if value.is_floating_point())
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0.0, atol=relative * scale, msg=f'{message}: {name}')


def test_fsdp2_wraps_head_and_blocks(tuning_results):
    _, ranks, _ = tuning_results
    for result in ranks:
        state = result['full']
        assert state['fsdp_config'] == 'FSDP2Config'
        assert state['head_type'] == 'FSDPContrastiveHead'
        assert state['head_param_type'] == 'DTensor'
        # activation_checkpointing: true wraps each block in a checkpoint wrapper around its FSDP unit.
        assert state['block_type'] == 'CheckpointWrapper'
        assert set(state['queue_types'].values()) == {'Tensor'}


def test_fsdp2_matches_one_process(tuning_results):
    reference, ranks, _ = tuning_results
    expected = reference['full']
    assert len(expected['losses']) == 4
    # Each rank's loss averages its own rows, so the global loss is the mean over ranks. Sums in float32 run in another
    # order (batch-norm statistics gathered over ranks, gradients reduce-scattered), and the loss divides by the
    # temperature, so values agree to about 1e-6 relative, not bit for bit.
    for step, loss in enumerate(expected['losses']):
        mean = sum(result['full']['losses'][step] for result in ranks) / len(ranks)
        assert mean == pytest.approx(loss, rel=1e-5), step

    order = expected['queue']['queue_ids'].argsort()
    for rank, result in enumerate(ranks):
        state = result['full']
        queue = state['queue']
        # The queue is replicated: every rank has all of it, and the same.
        assert queue['queue'].shape == expected['queue']['queue'].shape
        assert torch.equal(queue['queue'], ranks[0]['full']['queue']['queue'])
        rank_order = queue['queue_ids'].argsort()
        assert torch.equal(queue['queue_ids'][rank_order], expected['queue']['queue_ids'][order])
        assert torch.equal(queue['queue_labels'][rank_order], expected['queue']['queue_labels'][order])
        torch.testing.assert_close(queue['queue'][rank_order], expected['queue']['queue'][order], rtol=0, atol=1e-5)
        assert torch.equal(queue['queue_ptr'], expected['queue']['queue_ptr'])
        assert torch.equal(queue['num_filled'], expected['queue']['num_filled'])
        # Running statistics that match the 1-process run show that the batch norm saw the global batch.
        assert_close_to_scale(state['running_stats'], expected['running_stats'], 1e-5, f'rank {rank}')
        assert_close_to_scale(state['projector'], expected['projector'], 1e-5, f'rank {rank} projector')
        assert_close_to_scale(state['target_projector'], expected['target_projector'], 1e-5, f'rank {rank} target')


def test_fsdp2_sharded_checkpoint_resumes(tuning_results):
    _, ranks, out_dir = tuning_results
    checkpoint = out_dir / 'checkpoints' / 'ep0-ba2'
    assert (checkpoint / '.metadata').is_file()
    assert sorted(path.name for path in checkpoint.glob('*.distcp')) == ['__0_0.distcp', '__1_0.distcp']
    assert (out_dir / 'checkpoints' / 'latest-rank0').resolve() == (out_dir / 'checkpoints' / 'ep0-ba4').resolve()
    for result in ranks:
        full, first, resumed = result['full'], result['first'], result['resumed']
        assert first['losses'] == full['losses'][:2]
        assert resumed['start_batch'] == 2
        # The resumed run restores weights, optimizer, queue and RNG, so it repeats the same float operations.
        assert resumed['losses'] == full['losses'][2:]
        for name, value in full['queue'].items():
            assert torch.equal(resumed['queue'][name], value), name
        for name, value in full['target_projector'].items():
            assert torch.equal(resumed['target_projector'][name], value), name


@pytest.mark.slow
def test_fsdp2_resume_with_ema(tmp_path):
    ranks = run_tuning_script(tmp_path / 'two', 2, '--ema')
    for result in ranks:
        assert result['resumed']['losses'] == pytest.approx(result['full']['losses'][2:], rel=1e-5)

    # The sharded checkpoint contains the EMA weights in the model and the training weights in full in the EMA state.
    from composer_maect.checkpoints import load_encoder_weights
    from composer_maect.models.vit import create_encoder

    checkpoint = tmp_path / 'two' / 'checkpoints' / 'ep0-ba4'
    encoders = {}
    for weights in ('raw', 'ema'):
        encoders[weights] = create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=4)
        load_encoder_weights(encoders[weights], str(checkpoint), weights=weights)
    raw, ema = (dict(encoders[weights].named_parameters()) for weights in ('raw', 'ema'))
    assert torch.equal(raw['blocks.0.attn.qkv.weight'], ema['blocks.0.attn.qkv.weight'])  # frozen, not averaged
    assert not torch.equal(raw['blocks.3.attn.qkv.weight'], ema['blocks.3.attn.qkv.weight'])
    assert all(torch.isfinite(value).all() for value in raw.values())


# ---------------------------------------------------------------------------------------------------------------------
# The MNIST MAE-CT recipe under FSDP2: phase hand-over and EMA weights through sharded checkpoints


@pytest.mark.slow
def test_fsdp2_recipe_phases_sharded(tmp_path, mnist_shards):
    mae_checkpoint = tmp_path / 'runs' / 'mae-pretrain-mnist' / 'checkpoints' / 'latest-rank0.pt'
    single_process_loader = ['train_loader.num_workers=0', 'train_loader.persistent_workers=false']
    command = [
        *composer_launcher(),
        '-n',
        '2',
        '-m',
        'composer_maect.train',
        str(YAMLS / 'mae_ct_mnist.yaml'),
        f'variables.data_root={mnist_shards}',
        f'variables.mae_checkpoint={mae_checkpoint}',
        # MAE pre-training runs first, under DDP, because its YAML has no fsdp_config.
        f'run_first.overrides=[variables.data_root={mnist_shards},max_duration=3ba,save_interval=3ba,'
        + ','.join(single_process_loader)
        + ']',
        'phases.head_init.max_duration=3ba',
        'phases.tuning.max_duration=4ba',
        'save_interval=2ba',
        'console_log_interval=1ba',
        'callbacks.knn_monitor.max_train_samples=500',
        'fsdp_config={use_orig_params: true, activation_checkpointing: true, state_dict_type: sharded}',
        'save_latest_filename=latest-sharded-rank{rank}',
        *single_process_loader,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED='1', FSDP_VERSION='2')
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert 'dividing the gradients of 8 FSDP2 units by 2' in output
    assert re.search(r'Phase tuning starts from the weights of phase head_init \(.*latest-sharded-rank0\)', output)
    assert re.search(r'after tuning +top-1 [0-9.]+% \(k=10\), top-1 [0-9.]+% \(k=20\) \[EMA weights\]', output)
    for phase, batches in (('head_init', 3), ('tuning', 4)):
        folder = tmp_path / 'runs' / f'mae-ct-mnist-{phase}' / 'checkpoints' / f'ep0-ba{batches}'
        assert sorted(path.name for path in folder.glob('*.distcp')) == ['__0_0.distcp', '__1_0.distcp'], phase

    from composer_maect.checkpoints import load_checkpoint_file, load_encoder_weights, select_weights

    tuning = tmp_path / 'runs' / 'mae-ct-mnist-tuning' / 'checkpoints' / 'latest-sharded-rank0'
    checkpoint = load_checkpoint_file(tuning)
    assert 'maect_head.head.target_projector.0.weight' in checkpoint['state']['model']
    # Composer's EMA swaps its weights into the model before saving, so the DCP shards of every rank hold them.
    ema = select_weights(checkpoint, 'ema')
    encoder = create_encoder('vit_tiny_patch16', img_size=28, patch_size=7, depth=6)
    load_encoder_weights(encoder, str(tuning), weights='ema')
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, ema[f'encoder.{name}']), name
    # The training weights are in the EMA algorithm state, which the package's EMA stores as full tensors.
    raw = select_weights(checkpoint, 'raw')
    assert raw['encoder.blocks.5.attn.qkv.weight'].shape == ema['encoder.blocks.5.attn.qkv.weight'].shape
    assert not torch.equal(raw['encoder.blocks.5.attn.qkv.weight'], ema['encoder.blocks.5.attn.qkv.weight'])
    assert torch.equal(raw['encoder.blocks.0.attn.qkv.weight'], ema['encoder.blocks.0.attn.qkv.weight'])
