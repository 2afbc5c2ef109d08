"""Check local MDS shards against their ``index.json`` before any sample is read.

Without a remote, Streaming 0.13.0 does not notice a missing or truncated shard file until it reads it. It logs a
missing file from a background thread and silently leaves its samples out of the epoch. A truncated file fails with
a low-level decoding error. ``check_local_shards`` compares every shard file that ``index.json`` lists
with the file on disk, which costs one ``stat`` per shard.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ['ShardError', 'check_local_shards']

CONVERT_COMMAND = 'python -m composer_maect.data.convert SOURCE OUT'

_MAX_LISTED = 10


class ShardError(ValueError):
    """Local shards that do not match their ``index.json``. The message lists each shard file and its problem."""


def join_truncated(items: list[str], separator: str, max_items: int) -> str:
    """Join the first ``max_items`` items with ``separator`` and append the count of the rest, for error messages."""
    joined = separator.join(items[:max_items])
    if len(items) > max_items:
        joined += f'{separator}... and {len(items) - max_items} more'
    return joined


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _shard_problem(folder: str, shard: dict[str, Any]) -> str | None:
    """Return what is wrong with one shard of ``index.json``, or None when it can be read.

    A shard is readable when its raw file has the listed size, or when the raw file is absent and its compressed file
    has the listed size (Streaming decompresses it on first use).
    """
    raw, compressed = shard.get('raw_data'), shard.get('zip_data')
    raw_path = os.path.join(folder, raw['basename'])
    raw_size = _file_size(raw_path)
    if raw_size is not None:
        if raw_size == raw['bytes']:
            return None
        return f'{raw_path}: {raw_size} bytes, but index.json lists {raw["bytes"]} (truncated or overwritten)'
    if compressed is None:
        return f'{raw_path}: missing'
    zip_path = os.path.join(folder, compressed['basename'])
    zip_size = _file_size(zip_path)
    if zip_size is None:
        return f'{raw_path} and {os.path.basename(zip_path)}: both missing'
    if zip_size != compressed['bytes']:
        return f'{zip_path}: {zip_size} bytes, but index.json lists {compressed["bytes"]} (truncated or overwritten)'
    return None


def check_local_shards(folder: str) -> int:
    """Check that every shard file listed in ``folder/index.json`` exists with the listed size.

    Use it only for shards that are read without a remote. With a remote, Streaming downloads missing shards on
    demand, so a shard missing from the local cache is expected.

    Args:
        folder: the split folder that contains ``index.json``, such as ``OUT/train``.

    Returns:
        The number of samples that the shards hold.

    Raises:
        FileNotFoundError: ``folder/index.json`` does not exist.
        ShardError: ``index.json`` is not a valid Streaming index, or a shard file is missing or has another size
            than listed. The message names every such file (up to 10) and what to do.
    """
    index_path = os.path.join(folder, 'index.json')
    with open(index_path, encoding='utf-8') as file:
        text = file.read()
    try:
        shards = json.loads(text)['shards']
        problems = [problem for shard in shards if (problem := _shard_problem(folder, shard)) is not None]
        num_samples = sum(int(shard['samples']) for shard in shards)
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(
            f'{index_path} is not a valid Streaming index ({type(err).__name__}: {err}). It may be truncated. '
            f'Convert the data again into an empty folder (`{CONVERT_COMMAND}`), or copy the split again from where '
            f'it came from.'
        ) from err

    if problems:
        listed = join_truncated(problems, '\n  ', _MAX_LISTED)
        raise ShardError(
            f'{len(problems)} of the {len(shards)} shard files listed in {index_path} cannot be read:\n'
            f'  {listed}\n'
            f'Training on them would fail or silently skip their samples. Convert the data again into an empty '
            f'folder (`{CONVERT_COMMAND}`), or copy or download the split again from where it came from. If the '
            f'shards live in a remote, set the remote (train_loader.remote) so that Streaming downloads them.'
        )
    return num_samples
