"""Smoke test of the benchmark CLI on a tiny ViT: every requested row runs and the JSON has the documented fields."""

from __future__ import annotations

import json
import statistics

import pytest

from composer_maect import benchmark
from composer_maect.data.decode import DECODERS

ROW_CONTEXT_KEYS = ('command', 'device', 'precision', 'threads')
THROUGHPUT_KEYS = (
    'model',
    'img_size',
    'batch',
    'images_per_s',
    'reference_images_per_s',
    'overhead_ratio',
    'mfu',
    'reference_mfu',
    'flops_per_batch',
    'matmul_flops_per_s',
)
DATA_KEYS = (
    'num_workers',
    'decoder',
    'transform',
    'images',
    'img_size',
    'batch',
    'samples_per_s_per_worker',
    'reference_samples_per_s_per_worker',
    'overhead_ratio',
)

TINY_ARGS = [
    '--model', 'vit_tiny_patch16',
    '--depth', '2',
    '--img-size', '32',
    '--batch', '4',
    '--queue-size', '64',
    '--steps', '2',
    '--blocks', '2',
    '--warmup', '0',
    '--threads', '1',
    '--data-images', '16',
    '--data-batch', '4',
    '--data-img-size', '32',
]  # fmt: skip


@pytest.fixture(scope='module')
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp('benchmark') / 'rows.json'
    status = benchmark.main([*TINY_ARGS, '--rows', 'tuning,mae,data', '--profile', '--json', str(out)])
    assert status == 0
    with open(out) as file:
        return json.load(file)


def test_report_top_level_fields(report):
    assert report['command'].startswith('python -m composer_maect.benchmark')
    assert report['matmul_flops_per_s'] > 0
    assert report['matmul_flops_per_s'] == max(report['matmul_flops_per_s_measurements'])
    assert len(report['matmul_flops_per_s_measurements']) == 2
    assert isinstance(report['rows'], list)


def test_report_has_requested_rows(report):
    names = [row['row'] for row in report['rows']]
    assert names.count('tuning') == 1
    assert names.count('mae') == 1
    assert names.count('data') == len(benchmark.DATA_NUM_WORKERS) * len(DECODERS)


@pytest.mark.parametrize('key', ROW_CONTEXT_KEYS)
def test_every_row_names_context(report, key):
    for row in report['rows']:
        assert key in row, f'{row["row"]} row lacks {key!r}'
    assert all(row['command'] == report['command'] for row in report['rows'])
    assert all(row['device'] == 'cpu' for row in report['rows'])
    assert all(row['precision'] == 'fp32' for row in report['rows'])
    assert all(row['threads'] == 1 for row in report['rows'])
    model_rows = [row for row in report['rows'] if 'model' in row]
    assert model_rows
    assert all(row['depth'] == 2 and row['queue_size'] == 64 for row in model_rows)


@pytest.mark.parametrize('name', ['tuning', 'mae'])
def test_throughput_row_fields(report, name):
    row = next(row for row in report['rows'] if row['row'] == name)
    missing = [key for key in THROUGHPUT_KEYS if key not in row]
    assert not missing
    assert row['images_per_s'] > 0
    assert row['reference_images_per_s'] > 0
    assert row['flops_per_batch'] > 0
    assert 0 < row['mfu'] < 1
    expected_ratio = row['reference_images_per_s'] / row['images_per_s'] - 1
    assert row['overhead_ratio'] == pytest.approx(expected_ratio)
    assert row['matmul_flops_per_s'] == report['matmul_flops_per_s']
    expected_mfu = row['flops_per_batch'] * row['images_per_s'] / row['batch'] / report['matmul_flops_per_s']
    assert row['mfu'] == pytest.approx(expected_mfu)


def test_data_row_fields(report):
    rows = [row for row in report['rows'] if row['row'] == 'data']
    expected = [(workers, decoder) for workers in benchmark.DATA_NUM_WORKERS for decoder in DECODERS]
    assert [(row['num_workers'], row['decoder']) for row in rows] == expected
    for row in rows:
        missing = [key for key in DATA_KEYS if key not in row]
        assert not missing
        assert row['samples_per_s_per_worker'] > 0
        assert row['reference_samples_per_s_per_worker'] > 0
    # Both decoders of one worker count are compared with the same ImageFolder passes.
    for workers in benchmark.DATA_NUM_WORKERS:
        references = {row['reference_samples_per_s_per_worker'] for row in rows if row['num_workers'] == workers}
        assert len(references) == 1


@pytest.mark.parametrize('name', ['tuning', 'mae'])
def test_throughput_row_step_times(report, name):
    row = next(row for row in report['rows'] if row['row'] == name)
    # --steps 2 without --blocks: one block per step, each timed on its own.
    assert len(row['step_seconds']) == 2
    assert len(row['reference_step_cpu_seconds']) == 2
    assert row['batch'] / row['images_per_s'] == pytest.approx(statistics.median(row['step_seconds']))
    assert row['cpu_overhead_ratio'] > -1
    assert row['compile'] is False


def test_profile_names_step_parts(report):
    profile = next(row for row in report['rows'] if row['row'] == 'tuning')['profile_seconds']
    for part in ('whole Trainer step', 'queue lookup, 2 views', 'enqueue', 'encoder and head EMA'):
        assert profile['trainer'][part] > 0, part
    assert 'enqueue' not in profile['reference']
    assert profile['reference']['encoder forward, 2 views'] > 0


def test_decode_rows_compare_decoders(report):
    rows = [row for row in report['rows'] if row['row'] == 'decode']
    assert [row['decoder'] for row in rows] == ['PIL', 'torchvision.io.decode_jpeg']
    for row in rows:
        assert row['images'] == 16
        assert row['samples_per_cpu_s'] > 0


def test_gpu_rows_skip_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(benchmark.torch.cuda, 'is_available', lambda: False)
    out = tmp_path / 'gpu.json'
    assert benchmark.main([*TINY_ARGS, '--rows', 'gpu', '--json', str(out)]) == 0
    assert 'skipped: CUDA is not available on this machine' in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report['matmul_flops_per_s'] is None
    assert [row['row'] for row in report['rows']] == ['gpu']
    assert report['rows'][0]['skipped'] == 'CUDA is not available on this machine'


def test_cli_rejects_unknown_row(capsys):
    with pytest.raises(SystemExit):
        benchmark._parse_args(['--rows', 'tuning,speed'])
    assert "unknown rows ['speed']" in capsys.readouterr().err


def test_cli_rejects_queue_not_multiple_of_batch(capsys):
    with pytest.raises(SystemExit):
        benchmark._parse_args(['--batch', '3', '--queue-size', '64'])
    assert 'multiple of --batch' in capsys.readouterr().err


@pytest.mark.parametrize(
    ('argv', 'message'),
    [
        (['--data-batch', '0'], '--data-batch must be at least 1, got 0'),
        (['--data-img-size', '0'], '--data-img-size must be at least 1, got 0'),
        (['--depth', '0'], '--depth must be at least 1, got 0'),
        (['--gpu-batch', '0'], '--gpu-batch must be at least 1, got 0'),
        (['--steps', '2', '--blocks', '3'], '--blocks 3 must be at most --steps 2'),
        (['--rows', 'data', '--data-images', '7', '--data-batch', '4'], 'must be at least twice --data-batch 4'),
        (['--memory-batches', '8,x'], "--memory-batches takes comma-separated int values, got '8,x'"),
        (['--memory-batches', '3', '--queue-size', '64'], '--memory-batches value 3 must be a positive divisor'),
        (['--memory-models', ','], '--memory-models needs at least one comma-separated value'),
        (['--precision', 'bf16'], '--precision bf16 needs --device cuda'),
        (['--json', '/nonexistent-folder/rows.json'], 'folder /nonexistent-folder does not exist'),
    ],
)
def test_cli_rejects_bad_values(capsys, argv, message):
    with pytest.raises(SystemExit) as raised:
        benchmark._parse_args(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_gpu_batch_checked_only_with_cuda(monkeypatch, capsys):
    monkeypatch.setattr(benchmark.torch.cuda, 'is_available', lambda: False)
    assert benchmark._parse_args(['--batch', '4', '--queue-size', '96']).rows[-1] == 'gpu'
    monkeypatch.setattr(benchmark.torch.cuda, 'is_available', lambda: True)
    with pytest.raises(SystemExit):
        benchmark._parse_args(['--batch', '4', '--queue-size', '96'])
    assert 'or leave gpu out of --rows' in capsys.readouterr().err
