"""The ImageNet MAE-CT recipes against the reference hyperparameters, and their ``--dry-run`` reports."""

import math
import re
import sys
import time
from dataclasses import dataclass

import pytest

from composer_maect.config import ConfigError, TrainConfig, load_run
from composer_maect.dry_run import describe_run
from composer_maect.optim import scaled_lr
from composer_maect.train import main

from .conftest import YAMLS, run_command

ALL_YAMLS = sorted(YAMLS.glob('*.yaml'))

# Settings that every official MAE-CT ImageNet run shares: 2 views per image, queue 65536, layer decay 0.65, encoder
# base lr 1e-4 with weight decay 0.05, head weight decay 1e-5, 20 epochs of head initialisation (top-1, temperature
# 0.15).
QUEUE_SIZE = 65536
LAYER_DECAY = 0.65


@dataclass(frozen=True)
class Reference:
    encoder: str
    depth: int
    batch: int
    pooling: str
    frozen_blocks: int
    tuning_epochs: int
    temperature: float
    topk: int
    target_momentum: float
    encoder_lr: float  # actual peak lr of the final norm, before layer decay
    head_init_lr: float  # actual head lr in head_init
    tuning_head_lr: float  # actual head lr in tuning
    transform: str
    fsdp: bool


_B16 = {'encoder': 'vit_base_patch16', 'depth': 12, 'batch': 1024, 'pooling': 'mean_patch', 'frozen_blocks': 6}
_L16 = {'encoder': 'vit_large_patch16', 'depth': 24, 'batch': 1024, 'pooling': 'cls', 'frozen_blocks': 12}
_H16 = {'encoder': 'vit_huge_patch16', 'depth': 32, 'batch': 512, 'pooling': 'cls', 'frozen_blocks': 16}
_H14 = {'encoder': 'vit_huge_patch14', 'depth': 32, 'batch': 512, 'pooling': 'cls', 'frozen_blocks': 16}
_BL_LR = {'encoder_lr': 8e-4, 'head_init_lr': 8e-4}
_H_LR = {'encoder_lr': 4e-4, 'head_init_lr': 4e-4}
_CT = {'transform': 'contrastive'}
_AUG = {'transform': 'contrastive_aug'}

REFERENCE = {
    'mae_ct_vitb16.yaml': Reference(
        **_B16, **_BL_LR, **_CT, tuning_epochs=20, temperature=0.15, topk=20, target_momentum=0.99,
        tuning_head_lr=8e-4, fsdp=False,
    ),
    'mae_ct_vitl16.yaml': Reference(
        **_L16, **_BL_LR, **_CT, tuning_epochs=20, temperature=0.2, topk=20, target_momentum=0.99,
        tuning_head_lr=8e-4, fsdp=True,
    ),
    'mae_ct_vith16.yaml': Reference(
        **_H16, **_H_LR, **_CT, tuning_epochs=30, temperature=0.3, topk=20, target_momentum=0.995,
        tuning_head_lr=4e-4, fsdp=True,
    ),
    'mae_ct_vith14.yaml': Reference(
        **_H14, **_H_LR, **_CT, tuning_epochs=30, temperature=0.3, topk=20, target_momentum=0.995,
        tuning_head_lr=4e-4, fsdp=True,
    ),
    'mae_ct_vith.yaml': Reference(
        **_H14, **_H_LR, **_CT, tuning_epochs=30, temperature=0.3, topk=20, target_momentum=0.995,
        tuning_head_lr=4e-4, fsdp=True,
    ),
    'mae_ct_aug_vitb16.yaml': Reference(
        **_B16, **_BL_LR, **_AUG, tuning_epochs=80, temperature=0.15, topk=10, target_momentum=0.99,
        tuning_head_lr=4e-3, fsdp=False,
    ),
    'mae_ct_aug_vitl16.yaml': Reference(
        **_L16, **_BL_LR, **_AUG, tuning_epochs=40, temperature=0.15, topk=10, target_momentum=0.99,
        tuning_head_lr=4e-3, fsdp=True,
    ),
    'mae_ct_aug_vith16.yaml': Reference(
        **_H16, **_H_LR, **_AUG, tuning_epochs=40, temperature=0.35, topk=20, target_momentum=0.995,
        tuning_head_lr=2e-3, fsdp=True,
    ),
    'mae_ct_aug_vith14.yaml': Reference(
        **_H14, **_H_LR, **_AUG, tuning_epochs=40, temperature=0.35, topk=20, target_momentum=0.995,
        tuning_head_lr=2e-3, fsdp=True,
    ),
}  # fmt: skip

# One optimizer group line of the dry-run report: name, tensors, parameters, peak lr, weight decay.
_GROUP_LINE = re.compile(r'^\s+(\S+)\s+\d+ tensors\s+[\d,]+ params\s+lr (\S+)\s+weight decay (\S+)$', re.MULTILINE)
_PARAMETER_LINE = re.compile(r'^\s+(encoder|head|other|all)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$', re.MULTILINE)


def _phase_sections(report: str) -> dict[str, str]:
    """Split a dry-run report into ``{phase name: its section}``."""
    sections = re.split(r'^Phase \d+ of \d+: ', report, flags=re.MULTILINE)[1:]
    return {section.split(' ', 1)[0]: section for section in sections}


def _group_lrs(section: str) -> dict[str, tuple[float, float]]:
    return {name: (float(lr), float(wd)) for name, lr, wd in _GROUP_LINE.findall(section)}


def _parameter_counts(section: str) -> dict[str, tuple[int, int, int]]:
    counts = {}
    for part, *numbers in _PARAMETER_LINE.findall(section):
        counts[part] = tuple(int(number.replace(',', '')) for number in numbers)
    return counts


def _actual_lr(cfg: TrainConfig) -> float:
    return scaled_lr(
        cfg.optimizer.base_lr, cfg.global_train_batch_size, cfg.train_loader.views, cfg.optimizer.lr_scaling
    )


@pytest.fixture(autouse=True)
def _no_world_size(monkeypatch):
    """Keep a WORLD_SIZE of the shell that runs pytest out of the dry-run reports."""
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.delenv('FSDP_VERSION', raising=False)


@pytest.mark.parametrize('path', ALL_YAMLS, ids=lambda path: path.name)
def test_yaml_passes_load_run(path):
    plan = load_run(str(path))
    assert plan.phases
    if path.name.startswith('mae_ct_'):
        assert [cfg.name for cfg in plan.phases] == ['head_init', 'tuning']


def test_reference_covers_imagenet_recipes():
    imagenet_recipes = {path.name for path in ALL_YAMLS if path.name.startswith('mae_ct_') and 'mnist' not in path.name}
    assert imagenet_recipes == set(REFERENCE)


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_recipe_matches_reference(name):
    expected = REFERENCE[name]
    head_init, tuning = load_run(str(YAMLS / name)).phases

    for cfg in (head_init, tuning):
        assert cfg.model.name == 'vit_encoder'
        assert cfg.model.encoder.name == expected.encoder
        assert cfg.model.encoder.img_size == 224
        assert cfg.model.init_from is not None
        assert cfg.global_train_batch_size == expected.batch
        assert cfg.train_loader.views == 2
        assert cfg.train_loader.split == 'train'
        assert cfg.train_loader.transform.name == expected.transform
        assert cfg.train_loader.transform.scale == [0.08, 1.0]
        assert cfg.train_loader.transform.interpolation == 'bicubic'
        assert cfg.optimizer.lr_scaling == 'views'
        assert cfg.optimizer.betas == [0.9, 0.95]
        assert cfg.scheduler.warmup == 0.2
        assert cfg.scheduler.alpha_f == 0.0
        assert cfg.precision == 'amp_bf16'
        assert cfg.device_train_microbatch_size is None
        assert cfg.autoresume is True
        assert '{run_name}' in cfg.save_folder
        assert (cfg.fsdp_config is not None) == expected.fsdp
        if expected.fsdp:
            assert cfg.fsdp_config['sharding_strategy'] == 'FULL_SHARD'
            assert cfg.fsdp_config['state_dict_type'] == 'sharded'
            assert cfg.save_latest_filename == 'latest-sharded-rank{rank}'
        knn = cfg.callbacks['knn_monitor']
        assert knn['max_train_samples'] == 120000
        assert knn['k'] == [10, 20]
        assert knn['pooling'] == expected.pooling

    # Head initialisation: frozen encoder, top-1 neighbour, no target projector, head lr = the optimizer's lr.
    head = head_init.algorithms['contrastive_tuning']
    assert head_init.max_duration == '20ep'
    assert head_init.algorithms['layerwise_unfreezing'] == {'num_frozen_blocks': 'all'}
    assert head['pooling'] == expected.pooling
    assert head['queue_size'] == QUEUE_SIZE
    assert head['topk'] == 1
    assert head['temperature'] == 0.15
    assert head.get('target_momentum') is None
    assert (head['proj_hidden_dim'], head['pred_hidden_dim'], head['out_dim']) == (2048, 4096, 256)
    assert head_init.optimizer.weight_decay == 1e-5
    assert head.get('head_weight_decay', head_init.optimizer.weight_decay) == 1e-5
    assert math.isclose(_actual_lr(head_init) * head.get('head_lr_scale', 1.0), expected.head_init_lr)

    # Contrastive tuning: the lower half frozen, layer decay, top-k pick, EMA target projector and encoder EMA.
    head = tuning.algorithms['contrastive_tuning']
    assert tuning.max_duration == f'{expected.tuning_epochs}ep'
    assert tuning.algorithms['layerwise_unfreezing'] == {
        'num_frozen_blocks': expected.frozen_blocks,
        'layer_decay': LAYER_DECAY,
    }
    assert expected.frozen_blocks == expected.depth // 2
    assert head['pooling'] == expected.pooling
    assert head['queue_size'] == QUEUE_SIZE
    assert head['topk'] == expected.topk
    assert head['temperature'] == expected.temperature
    assert head['target_momentum'] == expected.target_momentum
    assert (head['proj_hidden_dim'], head['pred_hidden_dim'], head['out_dim']) == (2048, 4096, 256)
    assert head['head_weight_decay'] == 1e-5
    assert tuning.optimizer.base_lr == 1e-4
    assert tuning.optimizer.weight_decay == 0.05
    assert math.isclose(_actual_lr(tuning), expected.encoder_lr)
    assert math.isclose(_actual_lr(tuning) * head['head_lr_scale'], expected.tuning_head_lr)
    assert tuning.algorithms['ema'] == {'smoothing': 0.9999, 'half_life': None, 'update_interval': '1ba'}


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_dry_run_builds_reference_groups(name):
    """The optimizer groups that the algorithms build at INIT carry the reference learning rates."""
    expected = REFERENCE[name]
    report = describe_run(load_run(str(YAMLS / name)), world_size=8)
    sections = _phase_sections(report)
    assert set(sections) == {'head_init', 'tuning'}
    assert f'{expected.batch:,} images globally, {expected.batch // 8:,} per rank on 8 ranks' in report

    head_init = _group_lrs(sections['head_init'])
    assert set(head_init) == {'head.decay', 'head.no_decay'}
    assert math.isclose(head_init['head.decay'][0], expected.head_init_lr, rel_tol=1e-3)
    assert head_init['head.decay'][1] == 1e-5
    encoder_total, encoder_trainable, _ = _parameter_counts(sections['head_init'])['encoder']
    assert encoder_trainable == 0

    tuning = _group_lrs(sections['tuning'])
    top, lowest = expected.depth - 1, expected.frozen_blocks
    assert f'encoder.block{lowest - 1}.decay' not in tuning
    assert math.isclose(tuning[f'encoder.block{top}.decay'][0], expected.encoder_lr * LAYER_DECAY, rel_tol=1e-3)
    lowest_lr = expected.encoder_lr * LAYER_DECAY ** (expected.depth - lowest)
    assert math.isclose(tuning[f'encoder.block{lowest}.decay'][0], lowest_lr, rel_tol=1e-3)
    assert math.isclose(tuning['encoder.final.no_decay'][0], expected.encoder_lr, rel_tol=1e-3)
    assert tuning[f'encoder.block{top}.decay'][1] == 0.05
    assert math.isclose(tuning['head.decay'][0], expected.tuning_head_lr, rel_tol=1e-3)
    assert tuning['head.decay'][1] == 1e-5
    assert _parameter_counts(sections['tuning'])['encoder'][0] == encoder_total


def test_dry_run_cli_vith(tmp_path):
    """The report of the ViT-H/14 recipe, through the command line, on 8 processes."""
    command = [sys.executable, '-m', 'composer_maect.train', str(YAMLS / 'mae_ct_vith.yaml'), '--dry-run']
    start = time.perf_counter()
    result = run_command(['env', 'WORLD_SIZE=8', *command], cwd=tmp_path, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 60

    report = result.stdout
    assert 'Dry run of 2 phases with 8 processes' in report
    assert 'Phase 1 of 2: head_init (Trainer run name mae-ct-vith-head_init)' in report
    assert 'Phase 2 of 2: tuning (Trainer run name mae-ct-vith-tuning)' in report
    assert '512 images globally, 64 per rank on 8 ranks' in report
    assert 'model.init_from ./checkpoints/mae_pretrain_vit_huge.pth: NOT FOUND' in report
    assert 'FSDP1 (FSDP_VERSION is not 2)' in report

    sections = _phase_sections(report)
    head_init_counts = _parameter_counts(sections['head_init'])
    tuning_counts = _parameter_counts(sections['tuning'])
    assert head_init_counts['encoder'] == (630_764_800, 0, 630_764_800)
    # Blocks 16-31 (19,677,440 parameters each) and the final norm (2,560) train.
    assert tuning_counts['encoder'] == (630_764_800, 16 * 19_677_440 + 2_560, 630_764_800 - 16 * 19_677_440 - 2_560)

    groups = _group_lrs(sections['tuning'])
    assert math.isclose(groups['encoder.block31.decay'][0], 2.6e-4, rel_tol=1e-3)
    assert math.isclose(groups['encoder.block16.decay'][0], 4.06e-7, rel_tol=1e-3)
    assert 'encoder.block15.decay' not in groups
    assert math.isclose(groups['head.decay'][0], 4e-4, rel_tol=1e-3)
    assert 'FLOPs per image' in sections['tuning']
    assert 'contrastive_tuning {' in sections['tuning']
    assert 'ema {smoothing: 0.9999' in sections['tuning']
    assert 'knn_monitor {' in sections['tuning']


def test_dry_run_mnist_recipe(capsys):
    status = main([str(YAMLS / 'mae_ct_mnist.yaml'), 'variables.data_root=/nonexistent/mnist5k', '--dry-run'])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    report = captured.out
    assert 'run_first: mae_pretrain_mnist.yaml runs first' in report
    sections = _phase_sections(report)
    assert set(sections) == {'head_init', 'tuning'}
    assert set(_group_lrs(sections['head_init'])) == {'head.decay', 'head.no_decay'}
    assert {'encoder.block3.decay', 'encoder.block5.decay'} <= set(_group_lrs(sections['tuning']))
    assert "train_loader has no MDS shards (index.json) in '/nonexistent/mnist5k/train' and no remote" in report
    assert 'decoder auto, 2 DataLoader workers per rank' in report


def test_dry_run_reports_local_checkpoint_and_shards(tmp_path, capsys):
    checkpoint = tmp_path / 'mae.pth'
    checkpoint.write_bytes(b'\0' * 1024)
    split = tmp_path / 'imagenet' / 'train'
    split.mkdir(parents=True)
    (split / 'index.json').write_text('{"shards": [{"samples": 1000}, {"samples": 281}], "version": 2}')
    overrides = [f'variables.mae_checkpoint={checkpoint}', f'variables.data_local={tmp_path / "imagenet"}']
    status = main([str(YAMLS / 'mae_ct_vitb16.yaml'), *overrides, '--dry-run'])
    report = capsys.readouterr().out
    assert status == 0
    # The file exists but contains no checkpoint: the dry run reports it as a problem instead of failing.
    assert f'model.init_from {checkpoint}: does NOT match the encoder' in report
    assert '1,281 samples in the local index.json' in report
    # 1,281 samples at a global batch of 1,024 make one step per epoch.
    assert '20ep (about 1 step per epoch, 20 steps)' in report


def test_dry_run_misspelled_key_fails(capsys):
    status = main([str(YAMLS / 'mae_ct_vith.yaml'), 'optimizer.base_lrr=1e-4', '--dry-run'])
    error = capsys.readouterr().err
    assert status == 2
    assert "'optimizer.base_lrr': unknown key. Did you mean 'optimizer.base_lr'?" in error


def test_dry_run_misspelled_algorithm_argument_fails(capsys):
    override = 'phases.tuning.algorithms.contrastive_tuning.temprature=0.3'
    status = main([str(YAMLS / 'mae_ct_vith.yaml'), override, '--dry-run'])
    error = capsys.readouterr().err
    assert status == 2
    assert "Phase 'tuning', algorithms.contrastive_tuning:" in error
    assert "unexpected keyword argument 'temprature'" in error


def test_dry_run_rejects_queue_size():
    plan = load_run(str(YAMLS / 'mae_ct_vith.yaml'), ['phases.tuning.algorithms.contrastive_tuning.queue_size=1000'])
    with pytest.raises(ConfigError, match='queue size 1000 is not a multiple of the global batch size 512'):
        describe_run(plan)


def test_dry_run_rejects_indivisible_batch(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    with pytest.raises(ConfigError, match=r'512 must be a positive multiple of the number of processes \(3\)'):
        describe_run(load_run(str(YAMLS / 'mae_ct_vith.yaml')))


def test_dry_run_rejects_invalid_world_size(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', 'eight')
    with pytest.raises(ConfigError, match="Invalid world size 'eight'"):
        describe_run(load_run(str(YAMLS / 'mae_ct_vith.yaml')))


def test_dry_run_rejects_too_many_frozen_blocks():
    override = 'phases.tuning.algorithms.layerwise_unfreezing.num_frozen_blocks=40'
    with pytest.raises(ConfigError, match='num_frozen_blocks 40: it must be between 0 and the encoder depth 32'):
        describe_run(load_run(str(YAMLS / 'mae_ct_vith.yaml'), [override]))
