"""Tune a tiny ViT under FSDP2 for 4 batches, save a sharded checkpoint, autoresume from it, and write per-rank results.

Usage::

    composer -n 1 tests/scripts/fsdp_tuning_run.py OUT_DIR
    FSDP_VERSION=2 composer -n 2 tests/scripts/fsdp_tuning_run.py OUT_DIR

The setup comes from ``tuning_setup.py``, as in ``contrastive_tuning_run.py``: a global batch of 8 samples whatever
the number of ranks, fixed inputs, topk 1, no dropout, ContrastiveTuning with an EMA target projector and
LayerwiseUnfreezing with 2 of 4 blocks frozen. On 2 ranks the model is sharded by FSDP2 with the settings that
``composer_maect.fsdp.fsdp_settings`` makes of a recipe's ``fsdp_config``; on 1 rank it trains without a wrapper and
is the reference.

With ``--ema`` every trainer also runs the package's EMA algorithm. Three trainers run one after another:

* ``full``: 4 batches without interruption;
* ``first``: the same run stopped after 2 batches, saving a checkpoint (sharded on 2 ranks) at batch 2;
* ``resumed``: a new trainer with ``autoresume`` that loads that checkpoint and trains batches 3 and 4.

Each rank writes ``OUT_DIR/rank{rank}.pt`` with each trainer's losses, and, for ``full`` and ``resumed``, the queue
buffers, the head's batch-norm running statistics and the whole (gathered) target projector and head weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from composer import Callback, Trainer
from composer.utils import dist
from torch.distributed.tensor import DTensor

from composer_maect.algorithms import EMA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuning_setup import GLOBAL_BATCH, build_tuning, trainer_kwargs

from composer_maect.algorithms import ContrastiveTuning, LayerwiseUnfreezing
from composer_maect.fsdp import average_gloo_gradients, fsdp_settings

BATCHES = 4
STOP_AT = 2
# The fsdp_config of the ViT-L and ViT-H MAE-CT recipes.
RECIPE_FSDP_CONFIG = {
    'sharding_strategy': 'FULL_SHARD',
    'mixed_precision': 'DEFAULT',
    'use_orig_params': True,
    'activation_checkpointing': True,
    'activation_checkpointing_reentrant': False,
    'state_dict_type': 'sharded',
}


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def after_train_batch(self, state, logger):
        self.losses.append(float(state.loss['total']))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return the whole tensor. FSDP2 shards parameters as DTensors, and every rank must join the gather."""
    whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return whole.detach().clone()


def build_trainer(device_batch_size: int, save_folder: Path | None, *, autoresume: bool = False, ema: bool = False):
    """Build the tuning trainer; return ``(trainer, algorithm, recorder)``."""
    model, optimizer, loader, algorithm = build_tuning(device_batch_size, BATCHES)
    recorder = LossRecorder()
    world_size = dist.get_world_size()
    checkpointing = {}
    if save_folder is not None:
        checkpointing = {
            'run_name': 'fsdp-tuning',
            'save_folder': str(save_folder),
            'save_interval': f'{STOP_AT}ba',
            'save_latest_filename': 'latest-rank{rank}',
            'autoresume': autoresume,
        }
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=optimizer,
        max_duration=f'{BATCHES}ba',
        algorithms=[
            algorithm,
            LayerwiseUnfreezing(num_frozen_blocks=2, layer_decay=0.75),
            *([EMA(half_life=None, smoothing=0.9, update_interval='1ba')] if ema else []),
        ],
        callbacks=[recorder],
        parallelism_config={'fsdp': fsdp_settings(RECIPE_FSDP_CONFIG)} if world_size > 1 else None,
        **trainer_kwargs(),
        **checkpointing,
    )
    average_gloo_gradients(trainer.state.model)
    return trainer, algorithm, recorder


def final_state(trainer: Trainer, algorithm: ContrastiveTuning) -> dict:
    head = algorithm.head
    batchnorm = head.head.projector[1]
    queue_types = {name: type(buffer).__name__ for name, buffer in head.queue.named_buffers()}
    return {
        'wrapper': type(trainer.state.model).__name__,
        'fsdp_config': type(trainer.state.fsdp_config).__name__ if trainer.state.fsdp_config is not None else None,
        'head_type': type(trainer.state.model.maect_head).__name__,
        'block_type': type(trainer.state.model.encoder.blocks[3]).__name__,
        'head_param_type': type(head.head.projector[0].weight).__name__,
        'queue_types': queue_types,
        'queue': {name: buffer.clone() for name, buffer in head.queue.named_buffers()},
        'running_stats': {
            'running_mean': batchnorm.running_mean.clone(),
            'running_var': batchnorm.running_var.clone(),
        },
        'target_projector': {
            name: full_tensor(value) for name, value in head.head.target_projector.state_dict().items()
        },
        'projector': {name: full_tensor(value) for name, value in head.head.projector.state_dict().items()},
        'timestamp_batch': int(trainer.state.timestamp.batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', type=Path, help='folder for the rank{rank}.pt results and the checkpoints')
    parser.add_argument('--ema', action='store_true', help="add the package's EMA algorithm to every trainer")
    args = parser.parse_args()
    logging.basicConfig(format='%(name)s: %(message)s')
    world_size = dist.get_world_size()
    if world_size > 1 and os.environ.get('FSDP_VERSION') != '2':
        parser.error('More than one rank needs FSDP_VERSION=2: FSDP1 in Composer 0.32.1 needs CUDA.')
    device_batch_size = GLOBAL_BATCH // world_size
    checkpoints = args.out_dir / 'checkpoints'

    trainer, algorithm, recorder = build_trainer(device_batch_size, None, ema=args.ema)
    trainer.fit()
    results = {'full': {'losses': recorder.losses, **final_state(trainer, algorithm)}}
    trainer.close()

    trainer, algorithm, recorder = build_trainer(device_batch_size, checkpoints, ema=args.ema)
    trainer.fit(duration=f'{STOP_AT}ba')
    results['first'] = {'losses': recorder.losses}
    trainer.close()

    trainer, algorithm, recorder = build_trainer(device_batch_size, checkpoints, autoresume=True, ema=args.ema)
    results['resumed'] = {'start_batch': int(trainer.state.timestamp.batch)}
    trainer.fit()
    results['resumed'].update(losses=recorder.losses, **final_state(trainer, algorithm))
    trainer.close()

    results.update(rank=dist.get_global_rank(), world_size=world_size)
    torch.save(results, args.out_dir / f'rank{dist.get_global_rank()}.pt')


if __name__ == '__main__':
    main()
