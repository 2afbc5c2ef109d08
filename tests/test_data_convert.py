"""The converter: sources, held-out split, seeded order, skipped files, metadata and the CLI."""

import io
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from streaming import StreamingDataset

from composer_maect.data.convert import METADATA_FILENAME, convert, main, split_holdout
from composer_maect.data.sources import SourceImage, open_source

REPO = Path(__file__).resolve().parents[1]


def _noise_image(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {'L': (), 'RGB': (3,)}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8)
    return Image.fromarray(pixels)


def _save(image: Image.Image, path: Path, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_kwargs)
    return path


def _read_split(folder: Path) -> list[dict]:
    """Read every sample of one converted split, in stored order."""
    dataset = StreamingDataset(local=str(folder), remote=None, shuffle=False, batch_size=1)
    return [dataset[position] for position in range(dataset.num_samples)]


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob('*')) if path.is_file()}


@pytest.fixture
def image_folder(tmp_path) -> dict:
    """An ImageFolder with JPEG and PNG files, a truncated JPEG, an empty file, a text file and an empty class."""
    root = tmp_path / 'images'
    good = {}  # path -> label
    good[_save(_noise_image((20, 16), 'RGB', 1), root / 'cat' / 'a.jpg', quality=90)] = 0
    good[_save(_noise_image((12, 12), 'L', 2), root / 'cat' / 'b.jpg')] = 0
    good[_save(_noise_image((16, 20), 'RGB', 3), root / 'cat' / 'c.JPEG')] = 0
    good[_save(_noise_image((9, 7), 'RGB', 4), root / 'cat' / 'nested' / 'd.png')] = 0
    good[_save(_noise_image((10, 10), 'RGB', 5), root / 'dog' / 'a.png')] = 1
    good[_save(_noise_image((11, 13), 'RGB', 6).convert('P'), root / 'dog' / 'b.png')] = 1
    good[_save(_noise_image((24, 18), 'RGB', 7), root / 'dog' / 'c.jpg')] = 1

    whole = io.BytesIO()
    _noise_image((64, 64), 'RGB', 8).save(whole, format='JPEG')
    truncated = root / 'cat' / 'broken.jpg'
    truncated.write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])
    empty_file = root / 'dog' / 'zero.jpg'
    empty_file.write_bytes(b'')
    text_file = root / 'dog' / 'notes.txt'
    text_file.write_text('not an image\n')
    loose_file = root / 'README.md'
    loose_file.write_text('class folders below\n')
    (root / 'empty').mkdir()
    return {
        'root': root,
        'good': {str(path): label for path, label in good.items()},
        'truncated': str(truncated),
        'empty_file': str(empty_file),
        'text_file': str(text_file),
        'loose_file': str(loose_file),
    }


def test_image_folder_round_trip(image_folder, tmp_path):
    out = tmp_path / 'out'
    report = convert(str(image_folder['root']), str(out), seed=0, progress=False)

    assert report.layout == 'imagefolder'
    assert report.classes == ['cat', 'dog', 'empty']
    assert report.counts == {'train': {'cat': 4, 'dog': 3, 'empty': 0}}
    assert not (out / 'val').exists()

    samples = _read_split(out / 'train')
    assert [sample['index'] for sample in samples] == list(range(7))
    by_bytes = {Path(path).read_bytes(): (path, label) for path, label in image_folder['good'].items()}
    stored = Counter(sample['image'] for sample in samples)
    assert len(by_bytes) == 7
    assert stored == Counter(list(by_bytes)), 'every good file must be stored once, byte for byte'
    for sample in samples:
        path, label = by_bytes[sample['image']]
        assert sample['label'] == label, path
        assert isinstance(sample['label'], int)
        assert isinstance(sample['index'], int)


def test_jpeg_stored_byte_for_byte(image_folder, tmp_path):
    out = tmp_path / 'out'
    convert(str(image_folder['root']), str(out), progress=False)
    stored = {sample['image'] for sample in _read_split(out / 'train')}
    jpegs = [path for path in image_folder['good'] if path.lower().endswith(('.jpg', '.jpeg'))]
    assert len(jpegs) == 4
    for path in jpegs:
        assert Path(path).read_bytes() in stored, path


def test_unreadable_files_skipped_and_listed(image_folder, tmp_path):
    out = tmp_path / 'out'
    report = convert(str(image_folder['root']), str(out), progress=False)

    errors = {item.path: item.error for item in report.skipped}
    assert set(errors) == {
        image_folder['truncated'],
        image_folder['empty_file'],
        image_folder['text_file'],
        image_folder['loose_file'],
    }
    assert 'decode failed' in errors[image_folder['truncated']]
    assert 'truncated' in errors[image_folder['truncated']]
    assert errors[image_folder['empty_file']] == 'empty file'
    assert 'extension' in errors[image_folder['text_file']]
    assert 'class folder' in errors[image_folder['loose_file']]

    metadata = json.loads((out / METADATA_FILENAME).read_text())
    assert metadata == report.to_dict()
    assert {item['path'] for item in metadata['skipped']} == set(errors)
    assert metadata['classes'] == ['cat', 'dog', 'empty']
    assert metadata['counts'] == {'train': {'cat': 4, 'dog': 3, 'empty': 0}}
    assert metadata['num_samples'] == {'train': 7}


def test_report_format_lists_skipped(image_folder, tmp_path):
    report = convert(str(image_folder['root']), str(tmp_path / 'out'), progress=False)
    text = report.format()
    assert 'train: 7 images (1 classes without images: empty)' in text
    assert 'skipped: 4 files' in text
    assert image_folder['truncated'] in text
    assert image_folder['text_file'] in text
    shortened = report.format(max_skipped=1)
    assert '... and 3 more' in shortened


def test_empty_class_warns(image_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger='composer_maect.data.convert'):
        convert(str(image_folder['root']), str(tmp_path / 'out'), progress=False)
    assert any('empty' in record.getMessage() and 'count 0' in record.getMessage() for record in caplog.records)
    assert any('Skipped 4' in record.getMessage() for record in caplog.records)


def test_truncated_rejected_despite_global_flag(image_folder, tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, 'LOAD_TRUNCATED_IMAGES', True)
    report = convert(str(image_folder['root']), str(tmp_path / 'out'), progress=False)
    assert image_folder['truncated'] in {item.path for item in report.skipped}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, 'the global flag must be restored'


def test_existing_output_rejected(image_folder, tmp_path):
    out = tmp_path / 'out'
    convert(str(image_folder['root']), str(out), progress=False)
    with pytest.raises(FileExistsError, match='already contains converted data'):
        convert(str(image_folder['root']), str(out), progress=False)


def test_missing_source_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\['mnist5k', 'digits'\]"):
        convert(str(tmp_path / 'nowhere'), str(tmp_path / 'out'), progress=False)


def test_folder_without_classes_rejected(tmp_path):
    root = tmp_path / 'flat'
    _save(_noise_image((8, 8), 'RGB', 0), root / 'a.png')
    with pytest.raises(ValueError, match='no class folders'):
        convert(str(root), str(tmp_path / 'out'), progress=False)


def test_all_files_unreadable_rejected(tmp_path):
    root = tmp_path / 'broken'
    (root / 'cls').mkdir(parents=True)
    (root / 'cls' / 'a.jpg').write_bytes(b'garbage')
    with pytest.raises(ValueError, match='No readable image'):
        convert(str(root), str(tmp_path / 'out'), progress=False)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'val_fraction': 1.0}, 'val_fraction'),
        ({'val_fraction': -0.1}, 'val_fraction'),
        ({'seed': -1}, 'seed'),
        ({'compression': 'lz4000'}, 'Unknown compression'),
        ({'size_limit': 'lots'}, 'size_limit'),
        ({'size_limit': 0}, 'size_limit'),
    ],
)
def test_invalid_arguments_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert('digits', str(tmp_path / 'out'), progress=False, **kwargs)
    assert not (tmp_path / 'out').exists(), 'arguments must be checked before anything is written'


def _imagenet_layout(root: Path) -> None:
    seed = 0
    for split, per_class in (('train', 3), ('val', 2)):
        for name in ('n01', 'n02'):
            for position in range(per_class):
                seed += 1
                _save(_noise_image((12, 10), 'RGB', seed), root / split / name / f'{position}.JPEG')


def test_imagenet_layout_detected(tmp_path):
    root = tmp_path / 'imagenet'
    _imagenet_layout(root)
    (root / 'test').mkdir()  # Unlabelled test images are ignored.
    out = tmp_path / 'out'
    report = convert(str(root), str(out), progress=False)

    assert report.layout == 'imagenet'
    assert report.val_origin == 'source'
    assert report.classes == ['n01', 'n02']
    assert report.counts == {'train': {'n01': 3, 'n02': 3}, 'val': {'n01': 2, 'n02': 2}}
    val = _read_split(out / 'val')
    assert sorted(sample['label'] for sample in val) == [0, 0, 1, 1]
    val_files = {path.read_bytes() for path in (root / 'val').rglob('*.JPEG')}
    assert {sample['image'] for sample in val} == val_files


def test_imagenet_layout_rejects_val_fraction(tmp_path):
    root = tmp_path / 'imagenet'
    _imagenet_layout(root)
    with pytest.raises(ValueError, match='already has a val folder'):
        convert(str(root), str(tmp_path / 'out'), val_fraction=0.1, progress=False)


def test_imagenet_flat_val_rejected(tmp_path):
    root = tmp_path / 'imagenet'
    _save(_noise_image((8, 8), 'RGB', 0), root / 'train' / 'n01' / 'a.JPEG')
    _save(_noise_image((8, 8), 'RGB', 1), root / 'val' / 'ILSVRC2012_val_00000001.JPEG')
    with pytest.raises(ValueError, match='no class folders'):
        open_source(str(root))


def test_imagenet_unknown_val_class_rejected(tmp_path):
    root = tmp_path / 'imagenet'
    _save(_noise_image((8, 8), 'RGB', 0), root / 'train' / 'n01' / 'a.JPEG')
    _save(_noise_image((8, 8), 'RGB', 1), root / 'val' / 'n99' / 'b.JPEG')
    with pytest.raises(ValueError, match=r"not classes of the train split: \['n99'\]"):
        open_source(str(root))


def test_split_holdout_stratified():
    images = [SourceImage(label=label, name=str(position)) for position, label in enumerate([0] * 7 + [1] * 3)]
    train, val = split_holdout(images, 0.3, np.random.default_rng(0))

    # Shares 2.1 and 0.9 round down to 2 and 0, and the third val image goes to the larger remainder (class 1).
    assert Counter(image.label for image in val) == {0: 2, 1: 1}
    assert len(train) == 7
    assert {image.name for image in train} | {image.name for image in val} == {image.name for image in images}
    assert not {image.name for image in train} & {image.name for image in val}
    assert [int(image.name) for image in train] == sorted(int(image.name) for image in train)


def _digits_samples(folder: Path) -> Counter:
    """Count (pixel bytes, label) pairs of a converted digits split."""
    pairs = Counter()
    for sample in _read_split(folder):
        pixels = np.asarray(Image.open(io.BytesIO(sample['image'])))
        assert pixels.shape == (8, 8)
        assert pixels.dtype == np.uint8
        pairs[(pixels.tobytes(), sample['label'])] += 1
    return pairs


def test_digits_scaled_and_labelled(tmp_path):
    out = tmp_path / 'out'
    report = convert('digits', str(out), val_fraction=0.2, seed=0, progress=False)

    assert report.num_samples == {'train': 1438, 'val': 359}  # 0.2 * 1797 = 359.4 rounds to 359.
    assert report.val_origin == 'held_out'
    bunch = load_digits()
    expected = Counter(
        (np.rint(image * 255 / 16).astype(np.uint8).tobytes(), int(label))
        for image, label in zip(bunch.images, bunch.target, strict=True)
    )
    assert _digits_samples(out / 'train') + _digits_samples(out / 'val') == expected


def test_digits_same_seed_identical(tmp_path):
    first = convert('digits', str(tmp_path / 'first'), val_fraction=0.2, seed=3, progress=False)
    second = convert('digits', str(tmp_path / 'second'), val_fraction=0.2, seed=3, progress=False)
    other = convert('digits', str(tmp_path / 'other'), val_fraction=0.2, seed=4, progress=False)

    assert _file_bytes(tmp_path / 'first') == _file_bytes(tmp_path / 'second')
    assert first.counts == second.counts
    assert other.num_samples == first.num_samples
    first_shard = (tmp_path / 'first' / 'train' / 'shard.00000.mds').read_bytes()
    other_shard = (tmp_path / 'other' / 'train' / 'shard.00000.mds').read_bytes()
    assert first_shard != other_shard, 'a different seed must give a different order'


def test_image_folder_same_seed_identical(image_folder, tmp_path):
    convert(str(image_folder['root']), str(tmp_path / 'first'), seed=7, progress=False)
    convert(str(image_folder['root']), str(tmp_path / 'second'), seed=7, progress=False)
    assert _file_bytes(tmp_path / 'first') == _file_bytes(tmp_path / 'second')


def test_mnist5k_counts(tmp_path):
    out = tmp_path / 'out'
    report = convert('mnist5k', str(out), val_fraction=0.2, progress=False)

    assert report.num_samples == {'train': 4000, 'val': 1000}
    assert report.counts['val'] == {str(digit): 100 for digit in range(10)}
    for split, expected in (('train', 4000), ('val', 1000)):
        index = json.loads((out / split / 'index.json').read_text())
        assert sum(shard['samples'] for shard in index['shards']) == expected
    first = Image.open(io.BytesIO(_read_split(out / 'val')[0]['image']))
    assert first.size == (28, 28)
    assert first.mode == 'L'


def test_val_fraction_too_small_rejected(tmp_path):
    with pytest.raises(ValueError, match='leaves the val split empty'):
        convert('digits', str(tmp_path / 'out'), val_fraction=0.0001, progress=False)


def test_compression_and_small_shards(tmp_path):
    out = tmp_path / 'out'
    convert('digits', str(out), compression='zstd', size_limit='16kb', progress=False)

    shard_files = sorted(path.name for path in (out / 'train').iterdir() if path.name != 'index.json')
    assert len(shard_files) > 1
    assert all(name.endswith('.mds.zstd') for name in shard_files)
    samples = _read_split(out / 'train')
    assert [sample['index'] for sample in samples] == list(range(1797))


def test_failed_split_has_no_index(tmp_path, monkeypatch):
    import composer_maect.data.convert as convert_module

    read_checked = convert_module._read_checked
    calls = []

    def read_then_fail(image):
        calls.append(image)
        if len(calls) == 500:
            raise RuntimeError('disk failure')
        return read_checked(image)

    monkeypatch.setattr(convert_module, '_read_checked', read_then_fail)
    out = tmp_path / 'out'
    with pytest.raises(RuntimeError, match='disk failure'):
        convert('digits', str(out), size_limit='8kb', progress=False)
    assert any((out / 'train').glob('shard.*.mds')), 'shards before the failure were flushed'
    assert not (out / 'train' / 'index.json').exists()
    assert not (out / METADATA_FILENAME).exists()


def test_local_remote_pair_uploads(tmp_path):
    local, remote = tmp_path / 'local', tmp_path / 'remote'
    convert('digits', (str(local), str(remote)), val_fraction=0.1, progress=False)

    for folder in (local, remote):
        assert (folder / METADATA_FILENAME).is_file(), folder
        assert (folder / 'train' / 'index.json').is_file(), folder
        assert (folder / 'val' / 'index.json').is_file(), folder
    assert _file_bytes(local) == _file_bytes(remote)


def test_cli_main_prints_report(image_folder, tmp_path, capsys):
    out = tmp_path / 'out'
    status = main([str(image_folder['root']), str(out), '--seed', '1', '--no-progress'])

    assert status == 0
    printed = capsys.readouterr().out
    assert 'train: 7 images' in printed
    assert 'skipped: 4 files' in printed
    assert image_folder['truncated'] in printed
    assert json.loads((out / METADATA_FILENAME).read_text())['seed'] == 1


def test_cli_main_reports_errors(tmp_path, capsys):
    assert main(['digits', str(tmp_path / 'out'), '--val-fraction', '1.5', '--no-progress']) == 1
    assert 'val_fraction must be in [0, 1)' in capsys.readouterr().err
    assert main([str(tmp_path / 'nowhere'), str(tmp_path / 'out'), '--no-progress']) == 1
    assert 'Source not found' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['digits'])


def test_cli_size_limit_in_bytes(tmp_path):
    out = tmp_path / 'out'
    assert main(['digits', str(out), '--size-limit', '20000', '--no-progress']) == 0
    metadata = json.loads((out / METADATA_FILENAME).read_text())
    assert metadata['size_limit'] == 20000
    assert len(json.loads((out / 'train' / 'index.json').read_text())['shards']) > 1


def test_cli_subprocess(tmp_path):
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
    result = subprocess.run(
        [sys.executable, '-m', 'composer_maect.data.convert', 'digits', str(out), '--no-progress'],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert 'train: 1797 images' in result.stdout
    assert 'composer_maect.data.convert' in result.stderr, 'log lines name the module logger'
    assert json.loads((out / METADATA_FILENAME).read_text())['num_samples'] == {'train': 1797}
