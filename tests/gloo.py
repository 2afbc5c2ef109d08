"""Run a function on two gloo ranks on 127.0.0.1 in spawned processes and collect each rank's result."""

import os
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def spawn_ranks(worker: Callable[[int], dict], out_dir: Path, world_size: int = WORLD_SIZE) -> list[dict]:
    """Run ``worker(rank)`` on ``world_size`` gloo ranks and return their results; raise if a rank failed.

    ``worker`` must be a module-level function, because the spawned processes import it by name.
    """
    port = free_port()
    mp.spawn(_init_and_run, args=(worker, port, str(out_dir), world_size), nprocs=world_size, join=True)
    results = [torch.load(Path(out_dir) / f'rank{rank}.pt') for rank in range(world_size)]
    for rank, result in enumerate(results):
        if 'error' in result:
            raise AssertionError(f'rank {rank} failed:\n{result["error"]}')
    return results


def _init_and_run(rank: int, worker: Callable[[int], dict], port: int, out_dir: str, world_size: int) -> None:
    names = {name for _, name in socket.if_nameindex()}
    interface = next((name for name in ('lo', 'lo0') if name in names), None)
    if interface is not None:
        # Keep gloo on the loopback interface instead of the address that the host name resolves to.
        os.environ['GLOO_SOCKET_IFNAME'] = interface
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            'gloo',
            init_method=f'tcp://127.0.0.1:{port}',
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        result = worker(rank)
        dist.barrier()
    except Exception:
        result = {'error': traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    # NOTE: torch 2.7's ProcessGroupGloo destructor joins its worker threads while holding the GIL. A worker that is
    # still releasing a tensor with a Python object needs the GIL, so destroy_process_group (or interpreter exit) can
    # deadlock. The results are saved, so the process exits without running destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
