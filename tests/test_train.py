import re
import sys

import torch

from composer_maect.train import main

from .conftest import YAMLS, composer_launcher, run_command

MNIST_YAML = str(YAMLS / 'mae_pretrain_mnist.yaml')


def _losses(output: str) -> list[float]:
    return [float(value) for value in re.findall(r'loss/train/total: ([0-9.eE+-]+)', output)]


def test_missing_data_folder_is_reported(tmp_path, capsys):
    missing = tmp_path / 'no-shards-here'
    status = main([MNIST_YAML, 'prepare_data=null', f'variables.data_root={missing}'])
    error = capsys.readouterr().err
    assert status == 2
    assert f"no MDS shards (index.json) in '{missing}/train'" in error
    assert 'python -m composer_maect.data.convert mnist5k' in error


def test_cli_reports_misspelled_key_and_wrong_type(tmp_path):
    result = run_command(
        [sys.executable, '-m', 'composer_maect.train', MNIST_YAML, 'optimizer.base_lrr=1e-3', 'max_duration=[1]'],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "'optimizer.base_lrr': unknown key. Did you mean 'optimizer.base_lr'?" in result.stderr
    assert "'max_duration': invalid value a list; expected str | int." in result.stderr
    assert 'Traceback' not in result.stderr


def test_image_size_must_match_encoder(tmp_path, capsys, mnist_shards):
    status = main([MNIST_YAML, f'variables.data_root={mnist_shards}', 'train_loader.transform.img_size=32'])
    assert status == 2
    assert (
        "'train_loader.transform.img_size' (32) differs from 'model.encoder.img_size' (28)" in capsys.readouterr().err
    )


def test_readme_job_through_launcher(tmp_path):
    """The README's main job, shortened: it converts the digits, trains, saves a checkpoint and a reconstruction."""
    data_root = tmp_path / 'data'
    result = run_command(
        [
            *composer_launcher(),
            '-n',
            '1',
            '-m',
            'composer_maect.train',
            MNIST_YAML,
            f'variables.data_root={data_root}',
            'max_duration=2ep',
            'console_log_interval=1ba',
            'save_interval=1ep',
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (data_root / 'train' / 'index.json').is_file()
    assert (data_root / 'val' / 'index.json').is_file()
    checkpoint = tmp_path / 'runs' / 'mae-pretrain-mnist' / 'checkpoints' / 'latest-rank0.pt'
    assert checkpoint.exists()
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state']
    # 2 epochs of 4,000 digits in batches of 256, the last partial batch dropped.
    assert state['timestamp']['Timestamp']['batch'] == 30
    assert any(key.startswith('encoder.') for key in state['model'])
    pngs = list((tmp_path / 'runs' / 'mae-pretrain-mnist' / 'reconstructions').glob('*.png'))
    assert pngs
    losses = _losses(result.stdout + result.stderr)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_ddp_two_processes_train(tmp_path):
    """`composer -n 2` runs DDP over gloo; local rank 0 converts the data while rank 1 waits."""
    data_root = tmp_path / 'data'
    result = run_command(
        [
            *composer_launcher(),
            '-n',
            '2',
            '-m',
            'composer_maect.train',
            MNIST_YAML,
            f'variables.data_root={data_root}',
            'max_duration=4ba',
            'console_log_interval=1ba',
            'save_interval=4ba',
            'train_loader.num_workers=0',
            'train_loader.persistent_workers=false',
        ],
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert 'on 2 ranks' in output
    checkpoint = tmp_path / 'runs' / 'mae-pretrain-mnist' / 'checkpoints' / 'latest-rank0.pt'
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state']
    assert state['timestamp']['Timestamp']['batch'] == 4
    assert state['timestamp']['Timestamp']['sample'] == 4 * 256


def test_code_paths_register_a_callback(tmp_path, mnist_shards):
    plugin = tmp_path / 'plugin.py'
    marker = tmp_path / 'fit-started'
    plugin.write_text(
        'from pathlib import Path\n'
        'from composer.core import Callback\n'
        'from composer_maect.registry import callbacks\n'
        '\n'
        'class TouchOnFitStart(Callback):\n'
        '    def __init__(self, path):\n'
        '        self.path = path\n'
        '\n'
        '    def fit_start(self, state, logger):\n'
        "        Path(self.path).write_text('ok')\n"
        '\n'
        "callbacks.register('touch_on_fit_start', func=TouchOnFitStart)\n"
    )
    status = main(
        [
            MNIST_YAML,
            f'variables.data_root={mnist_shards}',
            f'code_paths=[{plugin}]',
            f'callbacks.touch_on_fit_start.path={marker}',
            'max_duration=1ba',
            'save_folder=null',
            'autoresume=false',
            f'callbacks.reconstruction_images.folder={tmp_path}/rec',
        ]
    )
    assert status == 0
    assert marker.read_text() == 'ok'


def test_mae_ct_recipe_runs_mae_first_then_phases(tmp_path):
    """The MNIST MAE-CT recipe, shortened: MAE runs first, then head initialisation and tuning, then a summary."""
    data_root = tmp_path / 'data'
    mae_checkpoint = tmp_path / 'runs' / 'mae-pretrain-mnist' / 'checkpoints' / 'latest-rank0.pt'
    command = [
        *composer_launcher(),
        '-n',
        '1',
        '-m',
        'composer_maect.train',
        str(YAMLS / 'mae_ct_mnist.yaml'),
        f'variables.data_root={data_root}',
        f'variables.mae_checkpoint={mae_checkpoint}',
        f'run_first.overrides=[variables.data_root={data_root},max_duration=3ba,save_interval=3ba]',
        'phases.head_init.max_duration=3ba',
        'phases.tuning.max_duration=3ba',
        'save_interval=3ba',
        'callbacks.knn_monitor.max_train_samples=500',
    ]
    result = run_command(command, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert mae_checkpoint.exists()
    for phase in ('head_init', 'tuning'):
        assert (tmp_path / 'runs' / f'mae-ct-mnist-{phase}' / 'checkpoints' / 'latest-rank0.pt').exists()
    tuning = tmp_path / 'runs' / 'mae-ct-mnist-tuning' / 'checkpoints' / 'latest-rank0.pt'
    model_state = torch.load(tuning, map_location='cpu', weights_only=False)['state']['model']
    assert 'maect_head.head.target_projector.0.weight' in model_state
    assert 'maect_head.queue.queue' in model_state
    assert 'k-NN accuracy of the encoder on the held-out split' in output
    assert re.search(r'before head_init +top-1 [0-9.]+% \(k=10\)', output)
    assert re.search(r'after tuning +top-1 [0-9.]+% \(k=10\), top-1 [0-9.]+% \(k=20\) \[EMA weights\]', output)

    # A second run finds every phase finished and resumes none of them.
    rerun = run_command(command, cwd=tmp_path)
    rerun_output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, rerun_output[-4000:]
    assert 'not found: running' not in rerun_output
    assert 'loss/train/nnclr' not in rerun_output
    assert 'after tuning' in rerun_output
