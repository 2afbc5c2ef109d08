"""No host-device synchronisation in the MAE-CT step: the algorithms' events run no op that reads device data.

The CPU has no stream to wait for, so these tests record the ATen ops that would block the host on a CUDA device:
reading a value (``item``, ``float``, ``bool``, ``tolist``), ops whose output size depends on the data (``nonzero``,
``masked_select``, ``unique``) and tensors built from Python data (``lift_fresh``), which copy from host memory.
Blocking copies of CPU tensors to the device cannot be seen on a CPU and are checked by reading the code.
"""

from collections import Counter

import torch
from composer.core import Event
from torch.utils._python_dispatch import TorchDispatchMode

from composer_maect.algorithms import EMA, ContrastiveTuning, LayerwiseUnfreezing
from composer_maect.models import global_batchnorm
from composer_maect.models.global_batchnorm import GlobalBatchNorm1d

from .test_contrastive_tuning import HEAD_DIMS, dict_loader, encoder_trainer

SYNC_OPS = frozenset(
    {
        'aten::_local_scalar_dense',
        'aten::is_nonzero',
        'aten::equal',
        'aten::nonzero',
        'aten::masked_select',
        'aten::_unique2',
        'aten::unique_dim',
        'aten::unique_consecutive',
        'aten::repeat_interleave',
        'aten::lift_fresh',
    }
)
LOG_INTERVAL = 2


class SyncOpRecorder(TorchDispatchMode):
    """Count the ops of ``SYNC_OPS`` that run while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def record_apply(algorithm, records: list) -> None:
    """Wrap ``algorithm.apply`` so that each call appends ``(event, batch, ops)`` to ``records``."""
    apply = algorithm.apply

    def recorded(event, state, logger):
        with SyncOpRecorder() as recorder:
            apply(event, state, logger)
        records.append((event, int(state.timestamp.batch), type(algorithm).__name__, dict(recorder.ops)))

    algorithm.apply = recorded


def test_tuning_step_has_no_sync_ops():
    algorithms = [
        ContrastiveTuning(queue_size=16, topk=2, target_momentum=0.9, log_interval=LOG_INTERVAL, **HEAD_DIMS),
        LayerwiseUnfreezing(num_frozen_blocks=2),
        EMA(half_life=None, smoothing=0.9, update_interval='1ba'),
    ]
    loader = dict_loader(16, ('view0', 'view1', 'index', 'label'))
    trainer, _, _ = encoder_trainer(algorithms, loader, max_duration='4ba')
    records = []
    for algorithm in algorithms:
        record_apply(algorithm, records)
    trainer.fit()
    trainer.close()

    step_events = (Event.BATCH_START, Event.BEFORE_FORWARD, Event.AFTER_LOSS, Event.BATCH_END)
    checked = [record for record in records if record[0] in step_events]
    assert {record[0] for record in checked} == set(step_events)
    for event, batch, name, ops in checked:
        if name == 'ContrastiveTuning' and event == Event.BATCH_END and batch % LOG_INTERVAL == 0:
            # Logging reads the queue fill and the neighbour accuracy, and only every log_interval batches.
            assert ops == {'aten::_local_scalar_dense': 2}, (event, batch, name)
        else:
            assert ops == {}, (event, batch, name)


def test_global_batchnorm_has_no_sync_ops(monkeypatch):
    """The multi-rank path, with the all-gather of two identical ranks replaced by a concatenation."""
    monkeypatch.setattr(global_batchnorm.distributed, 'world_size', lambda: 2)
    monkeypatch.setattr(global_batchnorm.distributed, 'all_gather_with_grad', lambda x: torch.cat([x, x]))
    norm = GlobalBatchNorm1d(8)
    x = torch.randn(4, 8, requires_grad=True)
    with SyncOpRecorder() as recorder:
        y = norm(x)
    assert recorder.ops == {}
    # Two identical ranks have the statistics of one, so the output is plain batch norm.
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True, eps=norm.eps))
