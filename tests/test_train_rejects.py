"""What `python -m composer_maect.train` rejects: damaged shards, undecodable samples, a NaN or infinite loss, a
checkpoint of another architecture and an image size that is not a multiple of the patch size."""

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import StreamingDataset

from composer_maect.data.convert import convert
from composer_maect.models.vit import create_encoder
from composer_maect.train import main

from .conftest import YAMLS, composer_launcher, run_command

MNIST_YAML = str(YAMLS / 'mae_pretrain_mnist.yaml')
CHECKPOINTS = Path('runs') / 'mae-pretrain-mnist' / 'checkpoints'


def _args(data_root: Path, *overrides: str) -> list[str]:
    """A short, small-batch run of the MNIST YAML on ``data_root``, relative to the current folder."""
    return [
        MNIST_YAML,
        f'variables.data_root={data_root}',
        'global_train_batch_size=32',
        'train_loader.num_workers=0',
        'train_loader.persistent_workers=false',
        'console_log_interval=1ba',
        'save_num_checkpoints_to_keep=-1',
        *overrides,
    ]


def _copy_shards(mnist_shards: Path, tmp_path: Path) -> Path:
    data_root = tmp_path / 'data'
    shutil.copytree(mnist_shards, data_root)
    return data_root


def _training_started(caplog) -> bool:
    return any(record.getMessage().startswith('Training MAEModel') for record in caplog.records)


# ---------------------------------------------------------------------------------------------------------------------
# Shards and samples
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('damage', ['truncated', 'missing'])
def test_damaged_shard_rejected_before_training(damage, mnist_shards, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    data_root = _copy_shards(mnist_shards, tmp_path)
    shard = data_root / 'train' / 'shard.00000.mds'
    if damage == 'truncated':
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        shard.unlink()

    with caplog.at_level(logging.INFO, logger='composer_maect'):
        status = main(_args(data_root, 'max_duration=2ba'))

    error = capsys.readouterr().err
    assert status == 1
    assert str(shard) in error
    expected = '1000 bytes, but index.json lists' if damage == 'truncated' else 'missing'
    assert expected in error
    assert 'python -m composer_maect.data.convert' in error
    assert not _training_started(caplog), 'the shards must be checked before the model is built'
    assert not CHECKPOINTS.exists()


def _noise_jpeg_folder(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for position in range(count):
        folder = root / f'class{position % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'{position:03d}.jpg', quality=90)


def _damage_sample(split: Path, position: int) -> bytes:
    """Overwrite the JPEG start marker of the sample at ``position`` inside its shard file; return the old bytes."""
    dataset = StreamingDataset(local=str(split), remote=None, shuffle=False, batch_size=1)
    data = dataset[position]['image']
    del dataset
    shard = split / 'shard.00000.mds'
    content = shard.read_bytes()
    assert content.count(data) == 1
    start = content.index(data)
    shard.write_bytes(content[:start] + b'\0\0\0\0' + content[start + 4 :])
    return data


@pytest.mark.parametrize('num_workers', [0, pytest.param(2, marks=pytest.mark.slow)])
def test_corrupt_sample_stops_run(num_workers, tmp_path, monkeypatch, capsys):
    """A JPEG sample damaged inside a shard of the right size stops the run with the shard file and sample index."""
    monkeypatch.chdir(tmp_path)
    _noise_jpeg_folder(tmp_path / 'images', 48)
    data_root = tmp_path / 'data'
    convert(str(tmp_path / 'images'), str(data_root), progress=False)
    _damage_sample(data_root / 'train', 29)

    status = main(
        _args(
            data_root,
            'global_train_batch_size=8',
            'max_duration=1ep',
            'save_interval=1ep',
            f'train_loader.num_workers={num_workers}',
        )
    )

    error = capsys.readouterr().err
    assert status == 1
    assert 'Failed to decode the image of sample 29' in error
    assert f'of shard file {data_root / "train" / "shard.00000.mds"}' in error
    assert 'python -m composer_maect.data.convert' in error
    if num_workers:
        assert 'DataLoader worker process' in error
    assert not list(CHECKPOINTS.glob('ep*')), 'a run that stops on a sample must not save the epoch'


def test_local_shard_missing_with_remote_is_fetched(mnist_shards, tmp_path):
    """With a remote, a shard missing from the local cache is downloaded, not rejected."""
    from composer_maect.data.dataset import build_image_dataloader

    local = tmp_path / 'cache'
    shutil.copytree(mnist_shards / 'val', local / 'val')
    (local / 'val' / 'shard.00000.mds').unlink()
    loader = build_image_dataloader(
        local=str(local), remote=str(mnist_shards), split='val', batch_size=100, shuffle=False
    )
    assert sum(len(batch['label']) for batch in loader) == 1000
    assert (local / 'val' / 'shard.00000.mds').is_file()


# ---------------------------------------------------------------------------------------------------------------------
# NaN and infinite losses
# ---------------------------------------------------------------------------------------------------------------------

# Registers the test algorithm `poison`: at batch `batch` (counted from 1) it records the checkpoint folder (file
# hashes and link targets) and then puts NaN into the input images or multiplies the loss by infinity.
POISON_PLUGIN = """
import hashlib
import json
import os
from pathlib import Path

from composer.core import Algorithm, Event

from composer_maect.registry import algorithms


class Poison(Algorithm):
    def __init__(self, batch, kind, folder, snapshot):
        self.batch, self.kind, self.folder, self.snapshot = batch, kind, Path(folder), Path(snapshot)

    def match(self, event, state):
        if int(state.timestamp.batch) + 1 != self.batch:
            return False
        return event == (Event.AFTER_DATALOADER if self.kind == 'nan_input' else Event.AFTER_LOSS)

    def apply(self, event, state, logger):
        if event == Event.AFTER_DATALOADER:
            self.snapshot.write_text(json.dumps(describe(self.folder)))
            state.batch['image'][0] = float('nan')
        else:
            self.snapshot.write_text(json.dumps(describe(self.folder)))
            state.loss = state.loss * float('inf')


def describe(folder):
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_symlink():
            files[path.name] = 'link to ' + os.readlink(path)
        else:
            files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


algorithms.register('poison', func=Poison)
"""


def _describe_folder(folder: Path) -> dict[str, str]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_symlink():
            files[path.name] = f'link to {path.readlink()}'
        else:
            files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _run_poisoned(mnist_shards: Path, tmp_path: Path, kind: str, *overrides: str) -> tuple[int, str, dict]:
    plugin = tmp_path / 'poison.py'
    plugin.write_text(POISON_PLUGIN)
    snapshot = tmp_path / 'snapshot.json'
    status = main(
        _args(
            mnist_shards,
            'max_duration=5ba',
            'save_interval=1ba',
            f'code_paths=[{plugin}]',
            f'algorithms.poison={{batch: 3, kind: {kind}, folder: {CHECKPOINTS}, snapshot: {snapshot}}}',
            *overrides,
        )
    )
    return status, json.loads(snapshot.read_text())


def _logged_losses(output: str) -> list[float]:
    return [float(value) for value in re.findall(r'loss/train/total: ([0-9.eE+-]+)', output)]


@pytest.mark.parametrize('kind', ['nan_input', pytest.param('inf_loss', marks=pytest.mark.slow)])
def test_nonfinite_loss_stops_before_checkpoint(kind, mnist_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, before = _run_poisoned(mnist_shards, tmp_path, kind)

    captured = capsys.readouterr()
    error = captured.err
    assert status == 1
    value = 'nan' if kind == 'nan_input' else 'inf'
    assert f'Training loss is not finite at batch 3 (epoch 0): loss/train/total={value}.' in error
    match = re.search(r'The last finite loss was loss/train/total=([0-9.eE+-]+) at batch 2\.', error)
    assert match is not None, error
    logged = _logged_losses(captured.out + captured.err)
    assert len(logged) == 2, 'batches 1 and 2 are logged, the stopped batch 3 is not'
    assert float(match.group(1)) == pytest.approx(logged[1], rel=1e-4)

    # The folder is exactly as it was when batch 3 started: ba1, ba2 and the latest link to ba2.
    assert before == _describe_folder(CHECKPOINTS)
    assert set(before) == {'ep0-ba1-rank0.pt', 'ep0-ba2-rank0.pt', 'latest-rank0.pt'}
    assert before['latest-rank0.pt'] == 'link to ep0-ba2-rank0.pt'
    state = torch.load(CHECKPOINTS / 'latest-rank0.pt', map_location='cpu', weights_only=False)['state']
    assert state['timestamp']['Timestamp']['batch'] == 2
    assert all(torch.isfinite(tensor).all() for tensor in state['model'].values())


@pytest.mark.slow
def test_nonfinite_loss_stop_switched_off(mnist_shards, tmp_path, monkeypatch, capsys):
    """With stop_on_nonfinite_loss false, the run trains on and Composer saves the NaN weights."""
    monkeypatch.chdir(tmp_path)
    status, _ = _run_poisoned(mnist_shards, tmp_path, 'nan_input', 'stop_on_nonfinite_loss=false')

    assert status == 0
    assert 'Training loss is not finite' not in capsys.readouterr().err
    state = torch.load(CHECKPOINTS / 'ep0-ba3-rank0.pt', map_location='cpu', weights_only=False)['state']
    assert not all(torch.isfinite(tensor).all() for tensor in state['model'].values())


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_stops_all(mnist_shards, tmp_path):
    """A NaN on rank 1 only reaches rank 0 through the averaged loss, so both ranks stop at the same batch."""
    plugin = tmp_path / 'poison.py'
    plugin.write_text(POISON_PLUGIN.replace('int(state.timestamp.batch) + 1 != self.batch', ONLY_RANK_1))
    snapshot = tmp_path / 'snapshot.json'
    command = [
        *composer_launcher(),
        '-n',
        '2',
        '-m',
        'composer_maect.train',
        *_args(
            mnist_shards,
            'max_duration=4ba',
            'save_interval=1ba',
            f'code_paths=[{plugin}]',
            f'algorithms.poison={{batch: 2, kind: nan_input, folder: {CHECKPOINTS}, snapshot: {snapshot}}}',
        ),
    ]
    result = run_command(command, cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert 'on 2 ranks' in output
    assert 'Training loss is not finite at batch 2 (epoch 0): loss/train/total=nan.' in output
    assert sorted(path.name for path in (tmp_path / CHECKPOINTS).glob('ep*')) == ['ep0-ba1-rank0.pt']


ONLY_RANK_1 = '__import__("composer").utils.dist.get_global_rank() != 1 or int(state.timestamp.batch) + 1 != self.batch'


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints of another architecture
# ---------------------------------------------------------------------------------------------------------------------


def test_init_from_other_architecture_rejected(mnist_shards, tmp_path, monkeypatch, capsys, caplog):
    """ViT-S weights into the ViT-T encoder of the MNIST YAML."""
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / 'vit_small.pth'
    small = create_encoder('vit_small_patch16', img_size=28, patch_size=7, depth=6)
    torch.save(small.state_dict(), weights)

    with caplog.at_level(logging.INFO, logger='composer_maect'):
        status = main(_args(mnist_shards, 'max_duration=1ba', f'model.init_from.path={weights}'))

    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("error: 'model.init_from': Checkpoint")
    assert 'blocks.0.attn.qkv.weight: (1152, 384) in the file, (576, 192) in the model' in error
    assert not _training_started(caplog)


def test_resume_other_architecture_rejected(mnist_shards, tmp_path, monkeypatch, capsys, caplog):
    """A real checkpoint of the 6-block encoder, resumed by a 4-block run (autoresume) and loaded by another run."""
    monkeypatch.chdir(tmp_path)
    assert main(_args(mnist_shards, 'max_duration=1ba', 'save_interval=1ba')) == 0
    latest = CHECKPOINTS / 'latest-rank0.pt'
    saved = _describe_folder(CHECKPOINTS)
    capsys.readouterr()
    caplog.clear()

    with caplog.at_level(logging.INFO, logger='composer_maect'):
        status = main(_args(mnist_shards, 'max_duration=2ba', 'model.encoder.timm_kwargs.depth=4'))
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith(f"error: 'autoresume': Checkpoint '{latest}' was saved from another model architecture")
    assert '24 tensors of the checkpoint are not in the model: encoder.vit.blocks.4.norm1.weight' in error
    assert 'model.encoder' in error
    assert not _training_started(caplog)

    status = main(
        _args(
            mnist_shards,
            'max_duration=2ba',
            'run_name=other',
            'autoresume=false',
            f'load_path={latest}',
            'model.encoder.timm_kwargs.embed_dim=96',
        )
    )
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith(f"error: 'load_path': Checkpoint '{latest}'")
    assert 'encoder.vit.cls_token: (1, 1, 192) in the checkpoint, (1, 1, 96) in the model' in error
    assert saved == _describe_folder(CHECKPOINTS), 'a rejected resume must not touch the checkpoints'


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------


def test_image_size_not_multiple_of_patch(mnist_shards, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger='composer_maect'):
        status = main(
            _args(mnist_shards, 'max_duration=1ba', 'model.encoder.img_size=30', 'train_loader.transform.img_size=30')
        )
    error = capsys.readouterr().err
    assert status == 2
    assert "'model.encoder': img_size (30, 30) is not a multiple of patch_size (7, 7)" in error
    assert '(28, 28)' in error
    assert not any('Created encoder' in record.getMessage() for record in caplog.records)
