"""Exact resumption of real training processes killed with SIGKILL, and the start-up clean-up of shared memory.

Each test runs ``composer -n N -m composer_maect.train`` on a tiny two-phase MAE-CT YAML built from
``yamls/mae_ct_mnist.yaml``: a 2-block ViT on 28x28 digits, 4 batches per epoch, a checkpoint after every batch. The
``batch_recorder`` callback (tests/scripts/batch_recorder.py) records every batch's loss and sample indices per rank
and pauses the run at a chosen batch, where the test kills the launcher's whole process group. The killed run is then
restarted with the same command (autoresume) and compared with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import REPO, YAMLS, composer_launcher

RUN_NAME = 'mae-ct-tiny'
PHASES = ('head_init', 'tuning')
BATCHES_PER_EPOCH = 4
EPOCHS_PER_PHASE = 2
BATCHES_PER_PHASE = BATCHES_PER_EPOCH * EPOCHS_PER_PHASE
GLOBAL_BATCH = 16
RECORDER = REPO / 'tests' / 'scripts' / 'batch_recorder.py'
RUN_TIMEOUT = 300
# Seeds the choice of the batch at which a run is killed.
KILL_SEED = 20240611


def tiny_mae_ct_yaml(folder: Path, data_root: Path, *, workers: int) -> Path:
    """Write a tiny two-phase MAE-CT YAML based on yamls/mae_ct_mnist.yaml, and the MAE checkpoint it starts from."""
    from composer_maect.models.vit import create_encoder

    config = yaml.safe_load((YAMLS / 'mae_ct_mnist.yaml').read_text())
    encoder_kwargs = {'depth': 2, 'embed_dim': 32, 'num_heads': 2}
    torch.manual_seed(0)
    encoder = create_encoder('vit_tiny_patch16', img_size=28, patch_size=7, **encoder_kwargs)
    mae_checkpoint = folder / 'mae.pt'
    torch.save({'model': encoder.state_dict()}, mae_checkpoint)

    config.pop('run_first')
    config['variables'].update(data_root=str(data_root), run_name=RUN_NAME, mae_checkpoint=str(mae_checkpoint))
    config['model']['encoder']['timm_kwargs'] = encoder_kwargs
    config['train_loader'].update(
        num_workers=workers,
        persistent_workers=workers > 0,
        # 4 batches per epoch, so that a phase crosses an epoch boundary.
        streaming={'epoch_size': BATCHES_PER_EPOCH * GLOBAL_BATCH},
    )
    config['global_train_batch_size'] = GLOBAL_BATCH
    config['callbacks'] = {'batch_recorder': {'path': str(folder / 'batches')}}
    config['code_paths'] = [str(RECORDER)]
    config['save_folder'] = str(folder / 'runs' / '{run_name}' / 'checkpoints')
    config.update(save_interval='1ba', console_log_interval='1ba', progress_bar=False)
    for phase in config['phases']:
        phase['max_duration'] = f'{EPOCHS_PER_PHASE}ep'
        tuning = phase['algorithms']['contrastive_tuning']
        tuning.update(proj_hidden_dim=32, pred_hidden_dim=64, out_dim=16, queue_size=4 * GLOBAL_BATCH)
        if phase['name'] == 'tuning':
            phase['algorithms']['layerwise_unfreezing']['num_frozen_blocks'] = 1
    path = folder / 'mae_ct_tiny.yaml'
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_command(yaml_path: Path, processes: int, *overrides: str) -> list[str]:
    return [*composer_launcher(), '-n', str(processes), '-m', 'composer_maect.train', str(yaml_path), *overrides]


def start(command: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """Start the launcher in its own process group, with stdout and stderr in ``log_path``."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    with log_path.open('a') as log_file:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(process: subprocess.Popen, log_path: Path, timeout: float = RUN_TIMEOUT) -> None:
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f'run timed out after {timeout} s:\n{log_path.read_text()[-4000:]}') from None
    assert status == 0, log_path.read_text()[-4000:]


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # Wait until no process of the group is left, so that no rank or DataLoader worker outlives the kill.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f'process group {process.pid} still alive 30 s after SIGKILL')


def wait_for(path: Path, process: subprocess.Popen, log_path: Path, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            output = log_path.read_text()[-4000:]
            raise AssertionError(f'run exited with {process.returncode} before {path.name}:\n{output}')
        if time.monotonic() > deadline:
            kill_group(process)
            raise AssertionError(f'{path.name} not written within {timeout} s:\n{log_path.read_text()[-4000:]}')
        time.sleep(0.2)


def read_batches(folder: Path, rank: int) -> list[dict]:
    path = folder / f'batches.rank{rank}.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def checkpoint_state(folder: Path, phase: str) -> dict:
    path = folder / 'runs' / f'{RUN_NAME}-{phase}' / 'checkpoints' / 'latest-rank0.pt'
    return torch.load(path, map_location='cpu', weights_only=False)['state']


def pause_overrides(phase: str, batch: int) -> list[str]:
    return [f'callbacks.batch_recorder.pause_run={RUN_NAME}-{phase}', f'callbacks.batch_recorder.pause_batch={batch}']


def run_to_end(folder: Path, yaml_path: Path, processes: int, *overrides: str) -> None:
    log_path = folder / 'log.txt'
    finish(start(train_command(yaml_path, processes, *overrides), folder, log_path), log_path)


def kill_and_resume(folder: Path, yaml_path: Path, processes: int, phase: str, batch: int, *overrides: str) -> None:
    """Run until ``batch`` batches of ``phase`` are done and checkpointed, SIGKILL every process, then restart."""
    log_path = folder / 'log.txt'
    process = start(train_command(yaml_path, processes, *overrides, *pause_overrides(phase, batch)), folder, log_path)
    wait_for(folder / 'batches.rank0.paused', process, log_path)
    kill_group(process)
    run_to_end(folder, yaml_path, processes, *overrides)


def assert_same_tensors(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same_tensors(actual[key], value, f'{what}.{key}')
        elif isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), f'{what}.{key}'


def assert_resumed_exactly(folder: Path, reference: Path, processes: int) -> None:
    """Compare every batch record and the final checkpoints of a killed and resumed run with the reference run.

    Batches are compared exactly: the resumed run restarts at its last checkpoint, so every batch that it trains must
    repeat the reference bit for bit, and a single differing crop would change every later loss. The checkpoints are
    compared with torch.equal for the same reason.
    """
    for rank in range(processes):
        expected = read_batches(reference, rank)
        actual = read_batches(folder, rank)
        assert len(expected) == len(PHASES) * BATCHES_PER_PHASE
        # Killed after a checkpoint, the run replays no batch: each batch is recorded once, by one of the two runs.
        assert [(r['run'], r['batch']) for r in actual] == [(r['run'], r['batch']) for r in expected], rank
        for got, want in zip(actual, expected, strict=True):
            assert got['index'] == want['index'], (rank, want['run'], want['batch'])
            assert got['loss'] == want['loss'], (rank, want['run'], want['batch'])
    for phase in PHASES:
        actual_state, expected_state = checkpoint_state(folder, phase), checkpoint_state(reference, phase)
        assert actual_state['timestamp']['Timestamp']['batch'] == BATCHES_PER_PHASE
        # The model state contains the encoder, the NNCLR head, its EMA target projector and the queue buffers.
        assert_same_tensors(actual_state['model'], expected_state['model'], f'{phase} model')
        assert_same_tensors(actual_state['optimizers'], expected_state['optimizers'], f'{phase} optimizer')
        expected_algorithms = dict(expected_state['algorithms'])
        for name, algorithm_state in actual_state['algorithms']:
            assert_same_tensors(algorithm_state, expected_algorithms[name], f'{phase} {name}')
    tuning_algorithms = dict(checkpoint_state(folder, 'tuning')['algorithms'])
    assert tuning_algorithms['EMA']['ema_model']['named_parameters_dict'], 'no EMA weights in the tuning checkpoint'


def kill_batch(phase: str, processes: int) -> int:
    """Draw the batch of ``phase`` after which a run is killed (1 to the last but one), from a seeded generator."""
    return random.Random(f'{KILL_SEED}-{phase}-{processes}').randint(1, BATCHES_PER_PHASE - 1)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, mnist_shards) -> Path:
    """The uninterrupted 1-process run."""
    folder = tmp_path_factory.mktemp('reference')
    run_to_end(folder, tiny_mae_ct_yaml(folder, mnist_shards, workers=2), 1)
    return folder


@pytest.mark.parametrize(
    ('phase', 'batch'),
    [
        ('head_init', kill_batch('head_init', 1)),
        pytest.param('tuning', 0, marks=pytest.mark.slow),
        pytest.param('tuning', kill_batch('tuning', 1), marks=pytest.mark.slow),
    ],
    ids=['head_init', 'phase_boundary', 'tuning'],
)
def test_sigkill_resume_exact(tmp_path, mnist_shards, reference_run, phase, batch):
    kill_and_resume(tmp_path, tiny_mae_ct_yaml(tmp_path, mnist_shards, workers=2), 1, phase, batch)
    assert_resumed_exactly(tmp_path, reference_run, 1)


@pytest.mark.parametrize(
    'batch', [-1, pytest.param(kill_batch('tuning', 1), marks=pytest.mark.slow)], ids=['fit_start', 'mid_epoch']
)
def test_sigkill_with_remote_leaves_shared_memory(tmp_path, mnist_shards, reference_run, batch):
    """A run on a remote, killed in tuning, leaves shared memory behind; the restart removes it and resumes exactly.

    Killed at FIT_START, the tuning dataset has registered its cache directory but created no file locks yet, so
    Streaming 0.13.0 alone would reject the restart with "Reused local directory".
    """
    from composer_maect.data.cache import find_registered_prefixes

    cache = tmp_path / 'cache'
    overrides = (f'train_loader.remote={mnist_shards}', f'train_loader.local={cache}')
    yaml_path = tiny_mae_ct_yaml(tmp_path, mnist_shards, workers=2)
    log_path = tmp_path / 'log.txt'
    pause = pause_overrides('tuning', batch)
    process = start(train_command(yaml_path, 1, *overrides, *pause), tmp_path, log_path)
    wait_for(tmp_path / 'batches.rank0.paused', process, log_path)
    kill_group(process)

    stale = find_registered_prefixes(str(cache / 'train'))
    assert stale, 'the killed run left no shared memory registered for its cache'
    # The restart also finds its local cache gone and downloads the shards again from the remote.
    shutil.rmtree(cache)
    run_to_end(tmp_path, yaml_path, 1, *overrides)

    output = log_path.read_text()
    assert f'Removed stale Streaming shared memory of a dead run for {cache / "train"}' in output
    for prefix in stale:
        assert not os.path.exists(f'/dev/shm/{prefix:06}_locals')
    assert_resumed_exactly(tmp_path, reference_run, 1)


def test_second_run_on_same_cache_rejected(tmp_path, mnist_shards):
    cache = tmp_path / 'cache'
    # Shorter phases: the first run only has to show that it continues after the second one failed.
    overrides = (
        f'train_loader.remote={mnist_shards}',
        f'train_loader.local={cache}',
        'phases.head_init.max_duration=3ba',
        'phases.tuning.max_duration=1ba',
    )
    first_folder, second_folder = tmp_path / 'first', tmp_path / 'second'
    first_folder.mkdir()
    second_folder.mkdir()
    first_yaml = tiny_mae_ct_yaml(first_folder, mnist_shards, workers=0)
    first_log = first_folder / 'log.txt'
    first = start(train_command(first_yaml, 1, *overrides, *pause_overrides('head_init', 1)), first_folder, first_log)
    wait_for(first_folder / 'batches.rank0.paused', first, first_log)

    second_yaml = tiny_mae_ct_yaml(second_folder, mnist_shards, workers=0)
    second = subprocess.run(
        train_command(second_yaml, 1, *overrides),
        cwd=second_folder,
        env=dict(os.environ, PYTHONUNBUFFERED='1'),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    output = second.stdout + second.stderr
    assert second.returncode != 0
    assert f"Local cache directory '{cache / 'train'}' is in use by another live run" in output
    assert 'Give each run its own train_loader.local' in output
    assert 'Traceback' not in output
    assert not read_batches(second_folder, 0)

    # The first run continues and finishes.
    (first_folder / 'batches.continue').touch()
    finish(first, first_log)
    assert len(read_batches(first_folder, 0)) == 3 + 1


@pytest.fixture(scope='module')
def reference_run_two_ranks(tmp_path_factory, mnist_shards) -> Path:
    """The uninterrupted 2-process run."""
    folder = tmp_path_factory.mktemp('reference-2')
    run_to_end(folder, tiny_mae_ct_yaml(folder, mnist_shards, workers=1), 2)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize('phase', PHASES)
def test_sigkill_two_ranks_resume_exact(tmp_path, mnist_shards, reference_run_two_ranks, phase):
    yaml_path = tiny_mae_ct_yaml(tmp_path, mnist_shards, workers=1)
    kill_and_resume(tmp_path, yaml_path, 2, phase, kill_batch(phase, 2))
    assert (tmp_path / 'batches.rank1.paused').exists()
    assert_resumed_exactly(tmp_path, reference_run_two_ranks, 2)
