import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
YAMLS = REPO / 'yamls'


def _track_streaming_handles() -> list:
    """Record every Streaming ``SharedMemory`` that this process creates or attaches to, and return the record.

    Streaming 0.13.0 registers each one for closing at exit, so its file descriptor stays open for the life of the
    process. Every new dataset also attaches to the blocks of all datasets before it without closing them. A test
    session that builds hundreds of datasets would otherwise reach the limit on open files (20,000 here).
    """
    from streaming.base.shared import memory

    handles: list = []
    original_init = memory.SharedMemory.__init__

    def init_and_track(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        handles.append(self)

    memory.SharedMemory.__init__ = init_and_track
    return handles


_STREAMING_HANDLES = _track_streaming_handles()


def _unlink_deleted_datasets_memory() -> None:
    """Unlink the blocks of the datasets that this process created and has deleted since.

    Streaming zeroes a dataset's ``_locals`` block when the dataset is deleted but unlinks its blocks only at exit,
    and every later dataset attaches to them.
    """
    from composer_maect.data.cache import unlink_streaming_prefix

    for handle in _STREAMING_HANDLES:
        for block in handle.created_shms:
            name = block.name.lstrip('/')
            if not name.endswith('_locals') or not os.path.exists(os.path.join('/dev/shm', name)):
                continue
            # The block starts with the int32 byte count of its contents, which deletion sets to 0.
            if int.from_bytes(bytes(block.buf[:4]), sys.byteorder, signed=True) <= 4:
                unlink_streaming_prefix(int(name.split('_')[0]))


def _close_unlinked_streaming_handles() -> None:
    """Close this process's handles on Streaming blocks that were unlinked, which nothing can attach to again."""
    still_open = []
    for handle in _STREAMING_HANDLES:
        blocks = [*handle.created_shms, *handle.opened_shms]
        if any(os.path.exists(os.path.join('/dev/shm', block.name.lstrip('/'))) for block in blocks):
            still_open.append(handle)
            continue
        try:
            for block in blocks:
                block.close()
        except BufferError:
            still_open.append(handle)  # An array still views the block, so the exit handler closes it.
    _STREAMING_HANDLES[:] = still_open


def _unlink_streaming_memory_under(folder: Path) -> None:
    from composer_maect.data.cache import find_registered_prefixes, unlink_streaming_prefix

    for prefix in find_registered_prefixes(os.path.abspath(folder), include_subdirectories=True):
        unlink_streaming_prefix(prefix)
    _unlink_deleted_datasets_memory()
    _close_unlinked_streaming_handles()


@pytest.fixture(autouse=True)
def _clean_streaming_shared_memory(request):
    """After a test, unlink the Streaming shared memory of the datasets on its ``tmp_path``, killed processes' too.

    Only blocks that register a directory below the test's own ``tmp_path`` are touched, so the shared memory of
    concurrent test sessions and training runs survives (``streaming.base.util.clean_stale_shared_memory()`` would
    remove it all).
    """
    # Requested before the test, so that tmp_path is torn down after this fixture.
    tmp_path = request.getfixturevalue('tmp_path') if 'tmp_path' in request.fixturenames else None
    yield
    if tmp_path is not None:
        _unlink_streaming_memory_under(tmp_path)


@pytest.fixture(scope='session', autouse=True)
def _clean_session_streaming_shared_memory(tmp_path_factory):
    """At the end of the session, unlink the Streaming shared memory of datasets below the session's temp folder."""
    yield
    _unlink_streaming_memory_under(tmp_path_factory.getbasetemp())


@pytest.fixture(scope='session')
def mnist_shards(tmp_path_factory) -> Path:
    """The 5,000 MNIST digits as MDS shards (4,000 train, 1,000 val), converted once per test session."""
    from composer_maect.data.convert import convert

    out = tmp_path_factory.mktemp('mnist5k')
    convert('mnist5k', str(out), val_fraction=0.2, seed=0, progress=False)
    return out


@pytest.fixture(scope='session')
def moto_server(tmp_path_factory):
    """A moto S3 server process on a free port of 127.0.0.1, shared by the session's tests."""
    from .s3 import start_moto_server

    server = start_moto_server(tmp_path_factory.mktemp('moto') / 'server.log')
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_server, tmp_path, monkeypatch):
    """An empty bucket on the moto server, with the environment of this test (and its subprocesses) pointed at it.

    The credentials are dummies with a unique secret, so a test can assert that the secret appears in no output.
    """
    import uuid

    from .s3 import UNSET_VARIABLES, S3Bucket, new_bucket_name, s3_environment

    for name in UNSET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    secret = f'secret-{uuid.uuid4().hex}'
    aws_folder = tmp_path / 'aws'
    aws_folder.mkdir()
    for name, value in s3_environment(moto_server.endpoint, secret, aws_folder).items():
        monkeypatch.setenv(name, value)
    bucket = S3Bucket(moto_server.endpoint, new_bucket_name(), secret)
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket


def composer_launcher() -> list[str]:
    """The `composer` launcher of the running interpreter's environment."""
    launcher = Path(sys.executable).with_name('composer')
    return [str(launcher)] if launcher.exists() else [shutil.which('composer') or 'composer']


def run_command(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_script_on_ranks(
    script: Path,
    out_dir: Path,
    num_processes: int,
    *script_args: str,
    fsdp_version: str | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> None:
    """Run ``script OUT_DIR *script_args`` under Composer's launcher on ``num_processes`` gloo ranks on 127.0.0.1.

    Rank r writes its stdout and stderr to ``out_dir/rank{r}.out`` and ``.err``. The ranks see ``FSDP_VERSION`` only
    when ``fsdp_version`` is given. A failed run fails the test with the tail of the launcher's and every rank's output.
    """
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.pop('FSDP_VERSION', None)
    if fsdp_version is not None:
        env['FSDP_VERSION'] = fsdp_version
    args = [
        *composer_launcher(),
        '-n',
        str(num_processes),
        '--stdout',
        str(out_dir / 'rank{rank}.out'),
        '--stderr',
        str(out_dir / 'rank{rank}.err'),
        str(script),
        str(out_dir),
        *script_args,
    ]
    result = subprocess.run(args, cwd=cwd or out_dir, env=env, capture_output=True, text=True, timeout=timeout)
    logs = ''.join(path.read_text()[-3000:] for path in sorted(out_dir.glob('rank*.err')))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs


# Rank layout that Composer reads from the environment once a torch.distributed group exists.
SINGLE_RANK_ENV = {'WORLD_SIZE': '1', 'RANK': '0', 'LOCAL_WORLD_SIZE': '1', 'LOCAL_RANK': '0', 'NODE_RANK': '0'}


@pytest.fixture
def single_rank_group(tmp_path, monkeypatch):
    """A one-process gloo group on a file store, in place of a multi-rank launch, destroyed after the test.

    It lets DistributedDataParallel or FSDP wrap a model in the test's own process, as Composer does on several ranks.
    """
    import torch.distributed

    for name, value in SINGLE_RANK_ENV.items():
        monkeypatch.setenv(name, value)
    torch.distributed.init_process_group('gloo', init_method=(tmp_path / 'store').as_uri(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
