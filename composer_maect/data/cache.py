"""Claim a dataset's local directory for this run and remove the Streaming shared memory that dead runs left for it.

Streaming (0.13.0) coordinates the ranks and DataLoader workers of one ``StreamingDataset`` through POSIX shared
memory blocks named ``{prefix:06}_{name}`` and through file locks ``{prefix:06}_barrier_filelock`` and
``{prefix:06}_cache_filelock`` in the temp directory. Each dataset registers its local directories (``local/split``,
as absolute paths) in its ``{prefix:06}_locals`` block. Streaming removes these only at a normal exit, so a run killed
with SIGKILL leaves them behind, and a restart with a remote then fails with "Reused local directory".
``streaming.base.util.clean_stale_shared_memory()`` removes every Streaming block on the machine, including those of
live runs, so it is not safe to call at start-up.

:func:`claim_local_directory` is targeted instead. It takes an ``flock`` on a lock file named after the directory. The
kernel releases the lock when the process exits, even by SIGKILL. A process that gets the lock exclusively therefore
knows that no live run of this package uses the directory, so every block registered for it is stale and is unlinked.

* With a remote, ``local`` is a cache that the run writes, and the lock stays exclusive for the lifetime of the
  process. A second run on the same cache gets :class:`LocalDirectoryInUseError`.
* Without a remote, ``local`` holds the shards themselves and is only read, so several runs may share it. The lock
  is downgraded to a shared lock after the clean-up, and a run that finds other readers cleans nothing.

NOTE: the blocks are found under ``/dev/shm``, which is Linux's location for POSIX shared memory. Elsewhere the lock
is still taken but nothing is cleaned.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time

import numpy as np
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN

__all__ = [
    'LocalDirectoryInUseError',
    'claim_local_directory',
    'find_registered_prefixes',
    'lock_file_path',
    'prepare_local_directory',
    'unlink_streaming_prefix',
]

log = logging.getLogger(__name__)

SHM_ROOT = '/dev/shm'
# How long a run without a remote waits for another run's exclusive lock, which a run without a remote holds only
# while it cleans up.
SHARED_LOCK_TIMEOUT_S = 10.0

_LOCALS_BLOCK = re.compile(rf'^(\d{{6}})_{LOCALS}$')
# File descriptors of the lock files that this process holds, by directory. They stay open until the process exits.
_held_locks: dict[str, int] = {}


class LocalDirectoryInUseError(RuntimeError):
    """Another live process holds the lock of a dataset's local directory. The message names the directory."""


def _lock_dir() -> str:
    return SHM_ROOT if os.path.isdir(SHM_ROOT) else tempfile.gettempdir()


def _dataset_dir(local: str, split: str | None) -> str:
    # The path that Streaming registers for the dataset.
    return os.path.abspath(os.path.join(local, split or ''))


def lock_file_path(directory: str, lock_dir: str | None = None) -> str:
    """Return the lock file of ``directory`` (an absolute path), in ``lock_dir`` (default: /dev/shm or the temp dir).

    The lock file lives outside ``directory`` because the local directory may be read-only.
    """
    digest = hashlib.sha256(directory.encode('utf-8')).hexdigest()[:24]
    return os.path.join(lock_dir or _lock_dir(), f'composer_maect_local_{digest}.lock')


def _read_locals(path: str) -> list[str]:
    """Return the directories in a ``_locals`` block: an int32 byte count, then paths and prefix, NUL-separated."""
    with open(path, 'rb') as file:
        data = file.read()
    if len(data) < 4:
        return []
    size = int(np.frombuffer(data[:4], np.int32)[0])
    if size <= 4:  # Streaming zeroes the count when a dataset is deleted.
        return []
    return data[4:size].decode('utf-8', errors='replace').split('\0')[:-1]


def find_registered_prefixes(
    directory: str, shm_root: str = SHM_ROOT, *, include_subdirectories: bool = False
) -> list[int]:
    """Return the Streaming shared-memory prefixes whose ``_locals`` block registers ``directory`` (an absolute path).

    With ``include_subdirectories``, a prefix that registers a directory below ``directory`` counts too.
    """
    if not os.path.isdir(shm_root):
        return []
    prefixes = []
    for name in sorted(os.listdir(shm_root)):
        match = _LOCALS_BLOCK.match(name)
        if match is None:
            continue
        try:
            registered = _read_locals(os.path.join(shm_root, name))
        except (FileNotFoundError, PermissionError):
            continue
        below = [path for path in registered if path.startswith(directory.rstrip(os.sep) + os.sep)]
        if directory in registered or (include_subdirectories and below):
            prefixes.append(int(match.group(1)))
    return prefixes


def unlink_streaming_prefix(prefix: int, shm_root: str = SHM_ROOT) -> list[str]:
    """Unlink the shared memory blocks and remove the file locks of one Streaming prefix; return what was removed."""
    removed = []
    paths = [os.path.join(shm_root, f'{prefix:06}_{name}') for name in SHM_TO_CLEAN]
    paths += [os.path.join(tempfile.gettempdir(), f'{prefix:06}_{name}') for name in (BARRIER_FILELOCK, CACHE_FILELOCK)]
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _take_shared_lock(fd: int, directory: str, lock_path: str) -> None:
    deadline = time.monotonic() + SHARED_LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise LocalDirectoryInUseError(
                    f'Local directory {directory!r} is the download cache of another live run, which has locked '
                    f'{lock_path} exclusively. Read the shards from their own folder, or give this run another '
                    'train_loader.local.'
                ) from None
            time.sleep(0.1)


def claim_local_directory(
    local: str, split: str | None = None, *, remote: str | None = None, lock_dir: str | None = None
) -> list[str]:
    """Lock ``local/split`` for this process and unlink the Streaming shared memory that dead runs registered for it.

    Call it before the ``StreamingDataset`` is built, on one process per node. A second call for the same directory
    in the same process does nothing.

    Returns:
        The shared memory blocks and lock files that were removed.

    Raises:
        LocalDirectoryInUseError: ``remote`` is set and another live process holds the directory's lock, or
            ``remote`` is None and another live run uses the directory as its download cache.
    """
    directory = _dataset_dir(local, split)
    if directory in _held_locks:
        return []
    lock_path = lock_file_path(directory, lock_dir)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if remote is not None:
            os.close(fd)
            raise LocalDirectoryInUseError(
                f'Local cache directory {directory!r} is in use by another live run, which has locked {lock_path}. '
                'Two runs point at the same local cache, which would corrupt it. Give each run its own '
                'train_loader.local.'
            ) from None
        # Other runs read the same shards: their shared memory is live, so nothing is cleaned.
        _take_shared_lock(fd, directory, lock_path)
        _held_locks[directory] = fd
        log.debug('Sharing local directory %s with other live runs', directory)
        return []

    os.ftruncate(fd, 0)
    os.write(fd, f'{directory}\n'.encode())
    removed = []
    for prefix in find_registered_prefixes(directory):
        removed += unlink_streaming_prefix(prefix)
    if removed:
        log.warning('Removed stale Streaming shared memory of a dead run for %s: %s', directory, ', '.join(removed))
    if remote is None:
        _take_shared_lock(fd, directory, lock_path)
    _held_locks[directory] = fd
    return removed


def prepare_local_directory(local: str, split: str | None = None, *, remote: str | None = None) -> None:
    """Run :func:`claim_local_directory` on local rank 0 of each node, then wait for it on every rank."""
    from composer.utils import dist

    if dist.get_local_rank() == 0:
        claim_local_directory(local, split, remote=remote)
    if dist.is_initialized():
        dist.barrier()
