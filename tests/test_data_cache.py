"""The start-up clean-up of Streaming shared memory for one local directory, and its lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from composer_maect.data.cache import (
    LocalDirectoryInUseError,
    claim_local_directory,
    find_registered_prefixes,
    lock_file_path,
)

pytestmark = pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='POSIX shared memory under /dev/shm (Linux)')

# Far above the prefixes that Streaming hands out (it takes the lowest free one), so no live dataset is touched.
FIRST_PREFIX = 990000 + os.getpid() % 9000

HOLD_LOCK = """
import sys, time
from composer_maect.data.cache import claim_local_directory
claim_local_directory(sys.argv[1], remote=sys.argv[2] or None, lock_dir=sys.argv[3])
print('locked', flush=True)
time.sleep(600)
"""


def register_block(prefix: int, directories: list[str]) -> list[str]:
    """Write the blocks and file locks that Streaming creates for a dataset on ``directories``; return their paths."""
    text = ('\0'.join(directories) + f'\0{prefix}').encode()
    paths = []
    for name, data in (('locals', np.int32(4 + len(text)).tobytes() + text), ('barrier', bytes(8))):
        path = f'/dev/shm/{prefix:06}_{name}'
        with open(path, 'wb') as file:
            file.write(data)
        paths.append(path)
    lock = os.path.join(tempfile.gettempdir(), f'{prefix:06}_cache_filelock')
    open(lock, 'w').close()
    return [*paths, lock]


def hold_lock(directory: str, remote: str, lock_dir: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, '-c', HOLD_LOCK, directory, remote, lock_dir], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == 'locked'
    return process


def test_claim_unlinks_only_own_blocks(tmp_path):
    mine, other = str(tmp_path / 'cache' / 'train'), str(tmp_path / 'other' / 'train')
    stale = register_block(FIRST_PREFIX, [mine])
    live = register_block(FIRST_PREFIX + 1, [other])
    try:
        assert find_registered_prefixes(mine) == [FIRST_PREFIX]
        removed = claim_local_directory(str(tmp_path / 'cache'), 'train', remote='s3://bucket/data', lock_dir=tmp_path)
        assert sorted(removed) == sorted(stale)
        assert not any(os.path.exists(path) for path in stale)
        assert all(os.path.exists(path) for path in live)
        assert find_registered_prefixes(str(tmp_path), include_subdirectories=True) == [FIRST_PREFIX + 1]
    finally:
        for path in stale + live:
            if os.path.exists(path):
                os.unlink(path)


def test_claim_rejects_cache_of_live_run(tmp_path):
    directory = str(tmp_path / 'cache')
    holder = hold_lock(directory, 's3://bucket/data', str(tmp_path))
    try:
        with pytest.raises(LocalDirectoryInUseError) as error:
            claim_local_directory(directory, remote='s3://bucket/data', lock_dir=tmp_path)
        assert f"Local cache directory '{directory}' is in use by another live run" in str(error.value)
        assert lock_file_path(directory, str(tmp_path)) in str(error.value)
        assert 'Give each run its own train_loader.local' in str(error.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the killed holder's lock.
    assert claim_local_directory(directory, remote='s3://bucket/data', lock_dir=tmp_path) == []


def test_claim_shares_directory_without_remote(tmp_path):
    directory = str(tmp_path / 'shards')
    holder = hold_lock(directory, '', str(tmp_path))
    # Blocks of the live reader.
    live = register_block(FIRST_PREFIX + 2, [directory])
    try:
        # Another live run reads the same shards, so this run removes nothing.
        assert claim_local_directory(directory, lock_dir=tmp_path) == []
        assert all(os.path.exists(path) for path in live)
        # A run that downloads into these shards as its cache is rejected while readers are alive.
        second = subprocess.run(
            [sys.executable, '-c', HOLD_LOCK, directory, 's3://bucket/data', str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode != 0
        assert 'LocalDirectoryInUseError' in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        for path in live:
            if os.path.exists(path):
                os.unlink(path)
