"""A test callback, loaded through a YAML's ``code_paths``, that records every batch and can pause the run.

Registered as ``batch_recorder``. Each rank appends one JSON line per batch to ``{path}.rank{rank}.jsonl``::

    {"run": run name, "batch": batches done after this one, "loss": total loss, "index": [sample indices]}

The loss is the float32 value as a Python float, so ``json`` writes it exactly. Lines are flushed at once, so a
process killed with SIGKILL leaves every finished batch on disk.

With ``pause_run`` and ``pause_batch`` set, every rank stops at ``BATCH_START`` of that run once ``pause_batch``
batches are done (0: before the run's first batch, after the DataLoader started iterating), writes
``{path}.rank{rank}.paused`` and waits, so that a test can kill the process group at a known point. ``pause_batch``
``-1`` stops at ``FIT_START`` instead, before the DataLoader starts. The rank continues when ``{path}.continue``
exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_maect.registry import callbacks

PAUSE_SECONDS = 3600


class BatchRecorder(Callback):
    def __init__(self, path: str, pause_run: str | None = None, pause_batch: int | None = None) -> None:
        self.path = path
        self.pause_run = pause_run
        self.pause_batch = pause_batch

    def _rank_path(self, suffix: str) -> Path:
        return Path(f'{self.path}.rank{dist.get_global_rank()}.{suffix}')

    def _pause(self, state: State) -> None:
        self._rank_path('paused').write_text(f'{state.run_name} {int(state.timestamp.batch)}')
        deadline = time.monotonic() + PAUSE_SECONDS
        while not Path(f'{self.path}.continue').exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.run_name == self.pause_run and self.pause_batch == -1:
            self._pause(state)

    def batch_start(self, state: State, logger: Logger) -> None:
        if state.run_name == self.pause_run and int(state.timestamp.batch) == self.pause_batch:
            self._pause(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = state.loss['total'] if isinstance(state.loss, dict) else state.loss
        record = {
            'run': state.run_name,
            'batch': int(state.timestamp.batch),
            'loss': float(loss.detach().float().item()),
            'index': [int(value) for value in state.batch['index']],
        }
        with self._rank_path('jsonl').open('a') as file:
            file.write(json.dumps(record) + '\n')


callbacks.register('batch_recorder', func=BatchRecorder)
