"""Streaming from and saving to s3:// against a real moto S3 server process on 127.0.0.1.

The runs stream MDS shards from the bucket and save checkpoints to it, then autoresume from the bucket alone. The
checks before training are run against an unreachable endpoint, misspelled names, missing credentials and a deleted
shard.
"""

import json
import re
import shutil
import socket
import sys

import pytest
import torch

from composer_maect.data.remote import RemoteDataError, check_output_bucket, check_remote_split
from composer_maect.train import final_checkpoint, run_yaml

from .conftest import YAMLS, composer_launcher, run_command

MAE_YAML = str(YAMLS / 'mae_pretrain_mnist.yaml')
MAE_CT_YAML = str(YAMLS / 'mae_ct_mnist.yaml')


# Imported through `code_paths` by every rank of a `composer -n 2` run: the subprocess form of fast_symlink_upload.
FAST_SYMLINK_UPLOAD_PLUGIN = """
from composer.callbacks import CheckpointSaver

_original_init = CheckpointSaver.__init__


def _init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    self._symlink_upload_wait_before_next_try_in_seconds = 1.0


CheckpointSaver.__init__ = _init
"""


@pytest.fixture
def fast_symlink_upload(monkeypatch):
    """Poll every second, not every 30 s, for the uploaded checkpoint before uploading the ``latest`` link.

    Composer's CheckpointSaver uploads the link only after it finds the checkpoint in the object store, and a run
    waits for that link when it closes.
    """
    from composer.callbacks import CheckpointSaver

    original_init = CheckpointSaver.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._symlink_upload_wait_before_next_try_in_seconds = 1.0

    monkeypatch.setattr(CheckpointSaver, '__init__', init)


@pytest.fixture
def remote_mnist(s3_bucket, mnist_shards):
    """The session's MNIST shards uploaded to ``s3://<bucket>/mnist``."""
    s3_bucket.upload_folder(mnist_shards, 'mnist')
    return s3_bucket.url('mnist')


def _batches(output: str) -> list[int]:
    """Return the batch numbers of the console logger's ``[batch=N/M]`` lines."""
    return [int(batch) for batch in re.findall(r'\[batch=(\d+)/\d+\]', output)]


def _console(capfd) -> str:
    """Return what the test's process wrote to its file descriptors 1 and 2; Composer's console logger writes to 2."""
    captured = capfd.readouterr()
    return captured.out + captured.err


def _mae_overrides(data_url: str, cache: str, save_folder: str) -> list[str]:
    return [
        'prepare_data=null',
        f'variables.data_root={cache}',
        f'train_loader.remote={data_url}',
        'train_loader.num_workers=1',
        'train_loader.persistent_workers=false',
        f'save_folder={save_folder}',
        'save_interval=2ba',
        'console_log_interval=1ba',
        'global_train_batch_size=64',
    ]


def _remote_split_error(url: str, split: str | None) -> str:
    """Return the message of the RemoteDataError that ``check_remote_split(url, split)`` must raise."""
    with pytest.raises(RemoteDataError) as error:
        check_remote_split(url, split)
    return str(error.value)


def _closed_port() -> int:
    """Return a port on 127.0.0.1 that was free a moment ago, so that connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# Checks before training
# ---------------------------------------------------------------------------------------------------------------------


def test_check_passes_on_complete_split(remote_mnist):
    result = check_remote_split(remote_mnist, 'train')
    assert result.url == f'{remote_mnist}/train'
    assert result.num_samples == 4000
    assert result.num_shards >= 1


def test_check_unreachable_endpoint(remote_mnist, monkeypatch):
    closed_port = _closed_port()
    monkeypatch.setenv('S3_ENDPOINT_URL', f'http://127.0.0.1:{closed_port}')
    message = _remote_split_error(remote_mnist, 'train')
    assert f'{remote_mnist}/train/index.json' in message
    assert f'http://127.0.0.1:{closed_port}' in message
    assert 'Check S3_ENDPOINT_URL' in message


def test_check_endpoint_password_not_shown(remote_mnist, monkeypatch):
    closed_port = _closed_port()
    monkeypatch.setenv('S3_ENDPOINT_URL', f'http://user:endpoint-password@127.0.0.1:{closed_port}')
    message = _remote_split_error(remote_mnist, 'train')
    assert f'http://127.0.0.1:{closed_port}' in message
    assert 'endpoint-password' not in message


def test_check_misspelled_bucket(remote_mnist, s3_bucket):
    url = remote_mnist.replace(s3_bucket.name, f'{s3_bucket.name}-typo')
    message = _remote_split_error(url, 'train')
    assert f"Bucket '{s3_bucket.name}-typo'" in message
    assert 'does not exist' in message
    assert 'Check the bucket name in train_loader.remote' in message


def test_check_misspelled_prefix(remote_mnist, s3_bucket):
    message = _remote_split_error(s3_bucket.url('mnsit'), 'train')
    assert f'{s3_bucket.url("mnsit/train/index.json")} not found' in message
    assert f"s3://{s3_bucket.name}/ has the folders ['mnist']" in message


def test_check_missing_split_names_splits(remote_mnist):
    message = _remote_split_error(remote_mnist, None)
    assert f'{remote_mnist}/index.json not found' in message
    assert "sub-folders ['train', 'val']: set train_loader.split" in message


def test_check_missing_credentials(remote_mnist, monkeypatch):
    monkeypatch.delenv('AWS_ACCESS_KEY_ID')
    monkeypatch.delenv('AWS_SECRET_ACCESS_KEY')
    message = _remote_split_error(remote_mnist, 'train')
    assert f'Access denied to {remote_mnist}/train/index.json' in message
    assert 'no AWS credentials were found' in message
    assert 'AWS_ACCESS_KEY_ID' in message


def test_check_access_denied(remote_mnist, s3_bucket):
    """Credentials that the store rejects; here a bucket policy denies every read."""
    policy = {
        'Version': '2012-10-17',
        'Statement': [
            {
                'Effect': 'Deny',
                'Principal': '*',
                'Action': 's3:GetObject',
                'Resource': f'arn:aws:s3:::{s3_bucket.name}/*',
            }
        ],
    }
    s3_bucket.client().put_bucket_policy(Bucket=s3_bucket.name, Policy=json.dumps(policy))
    message = _remote_split_error(remote_mnist, 'train')
    assert f'Access denied to {remote_mnist}/train/index.json' in message
    assert 'Check that the credentials are valid' in message
    assert s3_bucket.secret_access_key not in message


def test_check_partial_credentials(remote_mnist, monkeypatch):
    monkeypatch.delenv('AWS_SECRET_ACCESS_KEY')
    message = _remote_split_error(remote_mnist, 'train')
    assert 'missing: AWS_SECRET_ACCESS_KEY' in message


def test_check_missing_shard(remote_mnist, s3_bucket):
    shard_keys = [key for key in s3_bucket.keys('mnist/train/') if key.endswith('.mds')]
    s3_bucket.client().delete_object(Bucket=s3_bucket.name, Key=shard_keys[-1])
    message = _remote_split_error(remote_mnist, 'train')
    assert f'{remote_mnist}/train/index.json lists {len(shard_keys)} shards' in message
    assert f'1 of them are missing in {remote_mnist}/train: {shard_keys[-1].rsplit("/", 1)[1]}' in message


def test_check_local_remote_missing_shard(mnist_shards, tmp_path):
    remote = tmp_path / 'remote'
    shutil.copytree(mnist_shards, remote)
    shard = sorted((remote / 'val').glob('*.mds'))[0]
    assert check_remote_split(str(remote), 'val').num_samples == 1000
    shard.unlink()
    with pytest.raises(RemoteDataError, match=f'missing in {remote}/val: {shard.name}'):
        check_remote_split(str(remote), 'val')


def test_check_save_folder_bucket(s3_bucket, monkeypatch):
    check_output_bucket(s3_bucket.url('runs/{run_name}/checkpoints'))
    typo = f"Bucket '{s3_bucket.name}-typo' .* Check the bucket name in save_folder"
    with pytest.raises(RemoteDataError, match=typo):
        check_output_bucket(f's3://{s3_bucket.name}-typo/runs/{{run_name}}/checkpoints')
    monkeypatch.delenv('AWS_ACCESS_KEY_ID')
    monkeypatch.delenv('AWS_SECRET_ACCESS_KEY')
    with pytest.raises(RemoteDataError, match=r'No AWS credentials found to write to s3://.* \(save_folder\)'):
        check_output_bucket(s3_bucket.url('runs'))


def test_convert_rejects_missing_bucket(s3_bucket, capsys):
    from composer_maect.data.convert import main as convert_main

    url = f's3://{s3_bucket.name}-typo/mnist'
    assert convert_main(['digits', url, '--no-progress']) == 1
    error = capsys.readouterr().err
    assert f"error: Bucket '{s3_bucket.name}-typo' of {url} does not exist" in error
    assert 'Check the bucket name in OUT' in error


def test_cli_rejects_bad_remote_without_secret(remote_mnist, s3_bucket, tmp_path):
    """A misspelled bucket stops the run before the model is built; no log line contains the secret key."""
    url = remote_mnist.replace(s3_bucket.name, f'{s3_bucket.name}-typo')
    overrides = _mae_overrides(url, str(tmp_path / 'cache'), s3_bucket.url('runs/{run_name}'))
    result = run_command(
        [sys.executable, '-m', 'composer_maect.train', MAE_YAML, *overrides, 'python_log_level=debug'],
        cwd=tmp_path,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"error: Bucket '{s3_bucket.name}-typo' of {url}/train/index.json does not exist" in result.stderr
    assert 'Traceback' not in result.stderr
    assert 'Training MAEModel' not in output
    assert s3_bucket.secret_access_key not in output


# ---------------------------------------------------------------------------------------------------------------------
# Training from and to the object store
# ---------------------------------------------------------------------------------------------------------------------


def test_convert_train_autoresume_from_s3(s3_bucket, tmp_path, monkeypatch, capfd, fast_symlink_upload):
    """Convert to s3://, train from it saving to s3://, then resume twice from the bucket alone."""
    from composer_maect.data.convert import convert

    monkeypatch.chdir(tmp_path)
    data_url = s3_bucket.url('data/mnist5k')
    convert('mnist5k', data_url, val_fraction=0.2, seed=0, progress=False)
    assert {'data/mnist5k/metadata.json', 'data/mnist5k/train/index.json'} <= set(s3_bucket.keys('data/'))

    cache = tmp_path / 'cache'
    run_prefix = 'runs/mae-pretrain-mnist/checkpoints'
    overrides = _mae_overrides(data_url, str(cache), s3_bucket.url('runs/{run_name}/checkpoints'))
    run_yaml(MAE_YAML, [*overrides, 'max_duration=4ba'])
    assert _batches(_console(capfd)) == [1, 2, 3, 4]
    assert (cache / 'train' / 'index.json').is_file()
    keys = s3_bucket.keys(run_prefix)
    assert f'{run_prefix}/ep0-ba2-rank0.pt' in keys
    assert f'{run_prefix}/ep0-ba4-rank0.pt' in keys
    link = s3_bucket.client().get_object(Bucket=s3_bucket.name, Key=f'{run_prefix}/latest-rank0.pt.symlink')
    assert link['Body'].read().decode() == f'{run_prefix}/ep0-ba4-rank0.pt'

    # The data cache and every local copy are gone: the run resumes at batch 4 from the bucket and trains to the end.
    shutil.rmtree(cache)
    run_yaml(MAE_YAML, [*overrides, 'max_duration=6ba'])
    assert _batches(_console(capfd)) == [5, 6]
    assert f'{run_prefix}/ep0-ba6-rank0.pt' in s3_bucket.keys(run_prefix)

    # Composer keeps the checkpoint that autoresume downloaded under ./s3:/ and would load that copy (batch 4) again.
    # The trainer deletes it, so this start resumes from the bucket's latest checkpoint (batch 6).
    shutil.rmtree(cache)
    trainers = run_yaml(MAE_YAML, [*overrides, 'max_duration=8ba'])
    assert _batches(_console(capfd)) == [7, 8]
    assert int(trainers[0].state.timestamp.batch) == 8
    assert f'{run_prefix}/ep0-ba8-rank0.pt' in s3_bucket.keys(run_prefix)


@pytest.mark.slow
def test_phases_hand_over_through_s3(
    remote_mnist, mnist_shards, s3_bucket, tmp_path, monkeypatch, caplog, fast_symlink_upload
):
    """The tuning phase starts from head_init's checkpoint, read through the bucket's ``.symlink`` object."""
    from composer_maect.config import load_run

    monkeypatch.chdir(tmp_path)
    overrides = [
        'run_first=null',
        'model.init_from=null',
        f'variables.data_root={tmp_path / "cache"}',
        f'train_loader.remote={remote_mnist}',
        'train_loader.num_workers=0',
        'train_loader.persistent_workers=false',
        'global_train_batch_size=64',
        f'save_folder={s3_bucket.url("runs/{run_name}/checkpoints")}',
        'save_interval=2ba',
        'console_log_interval=1ba',
        f'callbacks.knn_monitor.train_local={mnist_shards / "train"}',
        f'callbacks.knn_monitor.val_local={mnist_shards / "val"}',
        'callbacks.knn_monitor.max_train_samples=500',
        'phases.head_init.max_duration=2ba',
        'phases.tuning.max_duration=2ba',
        # A different seed gives tuning other random weights, so its frozen blocks match head_init's only if loaded.
        'phases.tuning.seed=1',
        'phases.tuning.algorithms.ema=null',
    ]
    head_init, tuning = load_run(MAE_CT_YAML, overrides).phases
    link = final_checkpoint(head_init)
    assert link == s3_bucket.url('runs/mae-ct-mnist-head_init/checkpoints/latest-rank0.pt.symlink')

    run_yaml(MAE_CT_YAML, overrides)
    assert f'Phase tuning starts from the weights of phase head_init ({link})' in caplog.text

    client = s3_bucket.client()
    states = {}
    for phase in ('head_init', 'tuning'):
        path = tmp_path / f'{phase}.pt'
        client.download_file(s3_bucket.name, f'runs/mae-ct-mnist-{phase}/checkpoints/ep0-ba2-rank0.pt', str(path))
        states[phase] = torch.load(path, map_location='cpu', weights_only=False)['state']['model']
    frozen = 'encoder.blocks.0.attn.qkv.weight'
    torch.testing.assert_close(states['tuning'][frozen], states['head_init'][frozen], rtol=0, atol=0)
    assert final_checkpoint(tuning) == link.replace('head_init', 'tuning')


# ---------------------------------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_stream_save_and_resume_s3(remote_mnist, s3_bucket, tmp_path):
    """`composer -n 2` ranks and their DataLoader workers stream from the bucket, save to it and resume from it."""
    plugin = tmp_path / 'fast_symlink_upload.py'
    plugin.write_text(FAST_SYMLINK_UPLOAD_PLUGIN)
    overrides = _mae_overrides(remote_mnist, str(tmp_path / 'cache'), s3_bucket.url('runs/{run_name}/checkpoints'))
    overrides.append(f'code_paths=[{plugin}]')
    command = [*composer_launcher(), '-n', '2', '-m', 'composer_maect.train', MAE_YAML, *overrides]
    first = run_command([*command, 'max_duration=2ba'], cwd=tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert _batches(first.stdout + first.stderr) == [1, 2]

    shutil.rmtree(tmp_path / 'cache')
    second = run_command([*command, 'max_duration=4ba'], cwd=tmp_path)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert _batches(second.stdout + second.stderr) == [3, 4]
    assert 'runs/mae-pretrain-mnist/checkpoints/ep0-ba4-rank0.pt' in s3_bucket.keys('runs/')


@pytest.mark.slow
def test_two_ranks_stop_on_missing_shard(remote_mnist, s3_bucket, tmp_path):
    """Every rank stops with the same error; none waits for the others at a collective."""
    shard_key = next(key for key in s3_bucket.keys('mnist/train/') if key.endswith('.mds'))
    s3_bucket.client().delete_object(Bucket=s3_bucket.name, Key=shard_key)
    overrides = _mae_overrides(remote_mnist, str(tmp_path / 'cache'), s3_bucket.url('runs/{run_name}/checkpoints'))
    # Local rank 0 writes to the launcher's stderr, rank 1 to the file.
    command = [*composer_launcher(), '-n', '2', '--stderr', 'rank{rank}.err', '-m', 'composer_maect.train']
    result = run_command([*command, MAE_YAML, *overrides, 'max_duration=2ba'], cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    for rank, error in enumerate([result.stderr, (tmp_path / 'rank1.err').read_text()]):
        assert f'error: {remote_mnist}/train/index.json lists' in error, f'rank {rank}'
        assert 'Training MAEModel' not in error, f'rank {rank}'
        assert s3_bucket.secret_access_key not in error, f'rank {rank}'
    assert s3_bucket.secret_access_key not in result.stdout
