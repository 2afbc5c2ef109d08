"""check_local_shards on raw and compressed shards that the converter wrote, intact and damaged."""

import shutil
from pathlib import Path

import pytest

from composer_maect.data.convert import convert
from composer_maect.data.dataset import build_image_dataloader
from composer_maect.data.shards import ShardError, check_local_shards, join_truncated


@pytest.fixture(scope='module')
def digit_shards(tmp_path_factory) -> dict[str, Path]:
    """The 1,797 digits as raw shards and as zstd shards, both of at most 16 kB."""
    root = tmp_path_factory.mktemp('digit-shards')
    convert('digits', str(root / 'raw'), size_limit='16kb', progress=False)
    convert('digits', str(root / 'zstd'), size_limit='16kb', compression='zstd', progress=False)
    return {'raw': root / 'raw' / 'train', 'zstd': root / 'zstd' / 'train'}


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.parent.name
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize('kind', ['raw', 'zstd'])
def test_intact_shards_pass(kind, digit_shards):
    assert check_local_shards(str(digit_shards[kind])) == 1797


def test_truncated_and_missing_listed(digit_shards, tmp_path):
    split = _copy(digit_shards['raw'], tmp_path)
    truncated, missing = split / 'shard.00001.mds', split / 'shard.00003.mds'
    size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:-1])
    missing.unlink()

    with pytest.raises(ShardError) as raised:
        check_local_shards(str(split))
    message = str(raised.value)
    assert f'2 of the {len(list(split.glob("*.mds"))) + 1} shard files listed in {split / "index.json"}' in message
    assert f'{truncated}: {size - 1} bytes, but index.json lists {size} (truncated or overwritten)' in message
    assert f'{missing}: missing' in message
    assert 'python -m composer_maect.data.convert' in message


def test_compressed_shard_without_raw_passes(digit_shards, tmp_path):
    """Streaming decompresses a shard on first use, so a zstd file without its raw file is complete."""
    split = _copy(digit_shards['zstd'], tmp_path)
    assert not list(split.glob('*.mds')), 'the converter writes only the compressed files'
    assert check_local_shards(str(split)) == 1797


def test_compressed_shard_truncated_or_missing(digit_shards, tmp_path):
    split = _copy(digit_shards['zstd'], tmp_path)
    truncated, missing = split / 'shard.00000.mds.zstd', split / 'shard.00002.mds.zstd'
    truncated.write_bytes(truncated.read_bytes()[:100])
    missing.unlink()

    with pytest.raises(ShardError) as raised:
        check_local_shards(str(split))
    message = str(raised.value)
    assert f'{truncated}: 100 bytes, but index.json lists' in message
    assert f'{split / "shard.00002.mds"} and shard.00002.mds.zstd: both missing' in message


@pytest.mark.parametrize('content', ['', '{"shards": [{"raw_data": null}]}', '[1, 2]'])
def test_invalid_index_rejected(content, digit_shards, tmp_path):
    split = _copy(digit_shards['raw'], tmp_path)
    (split / 'index.json').write_text(content)
    with pytest.raises(ShardError, match='is not a valid Streaming index'):
        check_local_shards(str(split))


def test_dataloader_rejects_truncated_shard(digit_shards, tmp_path):
    split = _copy(digit_shards['raw'], tmp_path)
    shard = split / 'shard.00000.mds'
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r'shard\.00000\.mds: '):
        build_image_dataloader(local=str(split), batch_size=8)


def test_join_truncated_at_limit():
    assert join_truncated(['a', 'b', 'c'], ', ', 3) == 'a, b, c'
    assert join_truncated([], ', ', 3) == ''


def test_join_truncated_over_limit():
    assert join_truncated(['a', 'b', 'c', 'd', 'e'], ', ', 3) == 'a, b, c, ... and 2 more'
    assert join_truncated(['a', 'b'], '\n  ', 1) == 'a\n  ... and 1 more'
