"""Tests for ``python -m composer_maect.evaluate`` on a checkpoint of a short real MAE training run.

The run trains a two-block ViT on scikit-learn's digits (8x8 images, 1,438 train and 359 held-out) for two epochs with
Composer's EMA algorithm, so its checkpoint holds both the training weights and the EMA weights.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer_maect.data.convert import convert
from composer_maect.evaluate import load_encoder, main
from composer_maect.models.vit import create_encoder
from composer_maect.train import main as train_main

from .conftest import REPO, composer_launcher

ENCODER_ARGS = [
    '--encoder',
    'vit_tiny_patch16',
    '--img-size',
    '8',
    '--patch-size',
    '4',
    '--timm-kwargs',
    '{"depth": 2}',
]
FAST_ARGS = [
    '--resize-size',
    '8',
    '--mean',
    '0.5',
    '--std',
    '0.5',
    '--k',
    '5',
    '10',
    '--probe-epochs',
    '3',
    '--clustering-seeds',
    '2',
    '--lowshot-splits',
    '2',
    '--tsne-samples',
    '150',
]

TINY_MAE_YAML = """
run_name: eval-cli-test
seed: 0
device: cpu
precision: fp32
model:
  name: mae
  encoder: {{name: vit_tiny_patch16, img_size: 8, patch_size: 4, in_chans: 3, timm_kwargs: {{depth: 2}}}}
  decoder: {{dim: 32, depth: 1, num_heads: 2}}
  mask_ratio: 0.75
  norm_pix_loss: true
train_loader:
  local: {data}
  split: train
  views: 1
  transform: {{name: mae, img_size: 8, scale: [0.5, 1.0], hflip: false, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}
  shuffle: true
  num_workers: 0
global_train_batch_size: 128
max_duration: 2ep
optimizer: {{base_lr: 1.0e-3, lr_scaling: images, betas: [0.9, 0.95], weight_decay: 0.05}}
scheduler: {{warmup: 0.1, alpha_f: 0.0}}
algorithms:
  ema: {{smoothing: 0.5, half_life: null, update_interval: 1ba}}
console_log_interval: 1ep
save_folder: {save}
save_interval: 2ep
"""


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory) -> dict[str, Path]:
    """Digits shards and the checkpoint of a 2-epoch MAE run with EMA."""
    root = tmp_path_factory.mktemp('eval_cli')
    data = root / 'digits'
    convert('digits', str(data), val_fraction=0.2, seed=0, progress=False)
    yaml_path = root / 'tiny_mae.yaml'
    yaml_path.write_text(TINY_MAE_YAML.format(data=data, save=root / 'checkpoints'))
    assert train_main([str(yaml_path)]) == 0
    checkpoint = root / 'checkpoints' / 'latest-rank0.pt'
    assert checkpoint.exists()
    return {'root': root, 'data': data, 'checkpoint': checkpoint}


def _cli_args(run: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        str(run['checkpoint']),
        '--train',
        str(run['data'] / 'train'),
        '--test',
        str(run['data'] / 'val'),
        *ENCODER_ARGS,
        *FAST_ARGS,
        '--out',
        str(out),
        *extra,
    ]


def _is_fraction(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_cli_results_schema(trained_run, tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(_cli_args(trained_run, out)) == 0
    table = capsys.readouterr().out
    assert 'k-NN top-1, k=5, standardized' in table
    assert 'linear probe, best on test' in table
    assert 'k-means ACC' in table
    assert 'low-shot logistic regression, 1 per class (2 splits)' in table

    results = json.loads((out / 'results.json').read_text())
    assert results['schema_version'] == 1
    assert results['checkpoint']['weights'] == 'ema'
    assert results['encoder'] == {
        'name': 'vit_tiny_patch16',
        'img_size': 8,
        'patch_size': 4,
        'timm_kwargs': {'depth': 2},
        'pooling': 'cls',
        'embed_dim': 192,
    }
    assert results['data']['num_train'] == 1438
    assert results['data']['num_test'] == 359
    assert results['data']['classes'] == list(range(10))
    transform = {'img_size': 8, 'resize_size': 8, 'mean': [0.5] * 3, 'std': [0.5] * 3, 'decoder': 'auto'}
    assert results['data']['transform'] == transform
    assert results['protocols'] == ['knn', 'linear', 'clustering', 'lowshot']
    assert results['options']['ks'] == [5, 10]

    for variant in ('standardized', 'plain'):
        for key in ('top1@5', 'top5@5', 'purity@5', 'top1@10', 'top5@10', 'purity@10'):
            assert _is_fraction(results['knn'][variant][key]), (variant, key)
    assert results['knn']['settings']['temperature'] == 0.07

    probe = results['linear_probe']
    assert probe['epochs'] == 3
    assert len(probe['lrs']) == 10
    assert len(probe['test_accuracy']) == 3
    assert len(probe['test_accuracy'][0]) == 10
    for selected in ('val_selected', 'test_selected'):
        assert set(probe[selected]) == {'lr', 'epoch', 'selection_accuracy', 'test_accuracy'}
        assert _is_fraction(probe[selected]['test_accuracy'])
    assert probe['settings']['num_val_samples'] + probe['settings']['num_fit_samples'] == 1438

    clustering = results['clustering']
    assert [run['seed'] for run in clustering['per_seed']] == [0, 1]
    for summary in ('mean', 'std', 'best'):
        assert set(clustering[summary]) == {'accuracy', 'nmi', 'ari'}
    assert clustering['settings']['num_clusters'] == 10

    lowshot = results['lowshot']
    for setting, size in (('1_per_class', 10), ('2_per_class', 20), ('5_per_class', 50)):
        assert lowshot[setting]['train_sizes'] == [size, size]
        assert _is_fraction(lowshot[setting]['mean'])
    assert '1_percent' in lowshot
    assert lowshot['skipped'] == {}

    assert (out / 'tsne.png').read_bytes()[:4] == b'\x89PNG'
    assert (out / 'knn_confusion.png').read_bytes()[:4] == b'\x89PNG'
    assert sum(map(sum, results['plots']['knn_confusion']['matrix'])) == 359
    assert Path(results['feature_cache']).is_file()
    assert set(results['seconds']) == {'knn', 'linear', 'clustering', 'lowshot', 'plots'}


def test_cli_cache_reused_and_keyed(trained_run, tmp_path, caplog):
    out = tmp_path / 'out'
    args = _cli_args(trained_run, out, '--protocols', 'knn', '--no-plots')
    assert main(args) == 0
    first = json.loads((out / 'results.json').read_text())
    with caplog.at_level(logging.INFO, logger='composer_maect.evaluate'):
        assert main(args) == 0
    assert 'Read the features from the cache' in caplog.text
    second = json.loads((out / 'results.json').read_text())
    assert second['knn'] == first['knn']
    assert second['feature_cache'] == first['feature_cache']

    assert main(_cli_args(trained_run, out, '--protocols', 'knn', '--no-plots', '--weights', 'raw')) == 0
    raw = json.loads((out / 'results.json').read_text())
    assert raw['checkpoint']['weights'] == 'raw'
    assert raw['feature_cache'] != first['feature_cache']
    assert main(_cli_args(trained_run, out, '--protocols', 'knn', '--no-plots', '--pooling', 'mean_patch')) == 0
    assert main(_cli_args(trained_run, out, '--protocols', 'knn', '--no-plots', '--decoder', 'pil')) == 0
    pil = json.loads((out / 'results.json').read_text())
    assert pil['data']['transform']['decoder'] == 'pil'
    assert len(list(out.glob('features-*.pt'))) == 4


def test_cli_large_k_clipped(trained_run, tmp_path, caplog):
    out = tmp_path / 'out'
    args = _cli_args(trained_run, out, '--protocols', 'knn', '--no-plots')
    args[args.index('--k') + 1 : args.index('--k') + 3] = ['5', '5000']
    with caplog.at_level(logging.WARNING, logger='composer_maect.evaluate'):
        assert main(args) == 0
    assert 'k values [5000] are larger than the 1438 train samples' in caplog.text
    results = json.loads((out / 'results.json').read_text())
    assert results['knn']['settings']['clipped_to'] == 1438
    assert _is_fraction(results['knn']['standardized']['top1@5000'])


def test_ema_weights_by_default_from_real_run(trained_run):
    encoder_kwargs = {'encoder': 'vit_tiny_patch16', 'img_size': 8, 'patch_size': 4, 'timm_kwargs': {'depth': 2}}
    default_vit, default = load_encoder(trained_run['checkpoint'], **encoder_kwargs)
    raw_vit, raw = load_encoder(trained_run['checkpoint'], weights='raw', **encoder_kwargs)
    assert (default, raw) == ('ema', 'raw')
    key = 'blocks.0.attn.qkv.weight'
    assert not torch.equal(default_vit.state_dict()[key], raw_vit.state_dict()[key])


def test_encoder_model_keys_load(tmp_path):
    torch.manual_seed(0)
    vit = create_encoder('vit_tiny_patch16', img_size=8, patch_size=4, depth=1)
    path = tmp_path / 'vit_encoder_model.pt'
    model_state = {f'encoder.{key}': value for key, value in vit.state_dict().items()}
    model_state['maect_head.head.projector.0.weight'] = torch.zeros(2, 2)
    torch.save({'state': {'model': model_state}}, path)
    loaded, weights = load_encoder(path, encoder='vit_tiny_patch16', img_size=8, patch_size=4, timm_kwargs={'depth': 1})
    assert weights == 'raw'
    for key, value in vit.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    ('change', 'message'),
    [
        ({'checkpoint': 'missing.pt'}, "Checkpoint 'missing.pt' not found"),
        ({'--patch-size': '2'}, 'but the encoder has patch size'),
        ({'--timm-kwargs': '{depth: 2}'}, '--timm-kwargs is not valid JSON'),
        ({'--timm-kwargs': '[2]'}, '--timm-kwargs must be a JSON object'),
        ({'--protocols': 'knn,svm'}, "unknown or no protocols ['svm']"),
        ({'--mean': ['0.1', '0.2']}, '--mean takes 1 value'),
        ({'--test': 'no-such-split'}, "No MDS shards in 'no-such-split'"),
        ({'--encoder': 'not_a_vit'}, 'Invalid encoder specification'),
        ({'--lowshot-percent': ['150']}, '--lowshot-percent values must be in (0, 100]'),
    ],
)
def test_cli_bad_input(trained_run, tmp_path, capsys, change, message):
    args = _cli_args(trained_run, tmp_path / 'out', '--protocols', 'knn')
    for option, value in change.items():
        if option == 'checkpoint':
            args[0] = value
            continue
        position = args.index(option) if option in args else None
        values = value if isinstance(value, list) else [value]
        if position is None:
            args += [option, *values]
        else:
            args[position + 1] = values[0]
            args[position + 2 : position + 2] = values[1:]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith('error: ')
    assert message in error


def test_cli_ema_requested_without_ema(tmp_path, capsys, trained_run):
    vit = create_encoder('vit_tiny_patch16', img_size=8, patch_size=4, depth=2)
    path = tmp_path / 'plain.pt'
    torch.save({'model': vit.state_dict()}, path)
    args = _cli_args(trained_run, tmp_path / 'out', '--weights', 'ema')
    args[0] = str(path)
    assert main(args) == 2
    assert 'EMA weights were requested' in capsys.readouterr().err


def _run_here(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command with this checkout first on the import path, whichever copy of the package is installed."""
    env = dict(
        os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])
    )
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_module_entry_point(tmp_path):
    result = _run_here([sys.executable, '-m', 'composer_maect.evaluate', '--help'], tmp_path)
    assert result.returncode == 0
    assert '--protocols' in result.stdout
    result = _run_here(
        [sys.executable, '-m', 'composer_maect.evaluate', 'missing.pt', '--train', 'a', '--test', 'b', *ENCODER_ARGS],
        tmp_path,
    )
    assert result.returncode == 2
    assert "error: Checkpoint 'missing.pt' not found." in result.stderr
    assert 'Traceback' not in result.stderr


def test_two_ranks_match_one(trained_run, tmp_path):
    """Under `composer -n 2` each rank extracts half of each split. The gathered features equal one process's."""

    def evaluate_args(out: Path) -> list[str]:
        args = _cli_args(trained_run, out, '--protocols', 'knn,clustering', '--no-plots')
        # The launcher would read --std as an abbreviation of its --stdout and --stderr.
        return ['--pixel-std' if arg == '--std' else arg for arg in args]

    single = _run_here([sys.executable, '-m', 'composer_maect.evaluate', *evaluate_args(tmp_path / 'one')], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [*composer_launcher(), '-n', '2', '-m', 'composer_maect.evaluate']
    double = _run_here([*launcher, *evaluate_args(tmp_path / 'two')], tmp_path)
    assert double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]

    one = json.loads((tmp_path / 'one' / 'results.json').read_text())
    two = json.loads((tmp_path / 'two' / 'results.json').read_text())
    assert two['data']['num_train'] == one['data']['num_train'] == 1438
    assert two['knn'] == one['knn']
    assert two['clustering']['per_seed'] == one['clustering']['per_seed']
    features_one = torch.load(one['feature_cache'], weights_only=True)['features']
    features_two = torch.load(two['feature_cache'], weights_only=True)['features']
    for split in ('train', 'test'):
        torch.testing.assert_close(features_two[split]['features'], features_one[split]['features'])
        assert torch.equal(features_two[split]['indices'], features_one[split]['indices'])
