"""Tune a tiny ViT with ContrastiveTuning and LayerwiseUnfreezing for 3 batches, and write per-rank results.

Usage::

    composer -n 1 tests/scripts/contrastive_tuning_run.py OUT_DIR
    composer -n 2 tests/scripts/contrastive_tuning_run.py OUT_DIR

The global batch is 8 samples whatever the number of ranks, so a 1-rank run is the reference for a 2-rank run. Every
input is a fixed tensor: the dataset stores both views of each sample, the sampler does not shuffle, the queue
lookup takes the nearest neighbour (topk 1) and the ViT has no dropout.

Each rank writes ``OUT_DIR/rank{rank}.pt`` with the sample ids of its batches, its loss per batch, the gradients of
three parameters per batch after DDP averaged them, and the queue buffers and target-projector weights at the end.
It also records whether ContrastiveTuning in 'replace' mode rejects a ViT classifier whose trainable 10-class head
would get no gradient, which only matters under DDP.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import timm
import torch
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from composer.utils import dist
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuning_setup import GLOBAL_BATCH, build_tuning, trainer_kwargs

from composer_maect.algorithms import ContrastiveTuning, LayerwiseUnfreezing

BATCHES = 3
# Parameters whose gradients are compared: a head Linear weight, a head batch-norm weight and a weight of block 3,
# which LayerwiseUnfreezing leaves trainable.
GRADIENT_PARAMS = (
    'maect_head.head.projector.0.weight',
    'maect_head.head.projector.1.weight',
    'encoder.blocks.3.attn.qkv.weight',
)


class StepRecorder(Callback):
    """Record the batch ids at BEFORE_FORWARD, and the loss and the gradients at AFTER_TRAIN_BATCH."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.ids: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.gradients: list[dict[str, torch.Tensor]] = []

    def before_forward(self, state, logger):
        self.ids.append(state.batch['index'].clone())

    def after_train_batch(self, state, logger):
        self.losses.append(float(state.loss['total']))
        self.gradients.append({name: param.grad.detach().clone() for name, param in self.params.items()})


def tune_and_record(device_batch_size: int) -> dict:
    """Tune for 3 batches and return the recorded ids, losses, gradients, queue and target projector."""
    model, optimizer, loader, algorithm = build_tuning(device_batch_size, BATCHES)
    # The head and its queue join the model at INIT, so the recorder looks the parameters up then.
    recorder = StepRecorder({})
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=optimizer,
        max_duration=f'{BATCHES}ba',
        algorithms=[algorithm, LayerwiseUnfreezing(num_frozen_blocks=2, layer_decay=0.75)],
        callbacks=[recorder],
        **trainer_kwargs(),
    )
    named = dict(model.named_parameters())
    recorder.params = {name: named[name] for name in GRADIENT_PARAMS}
    trainer.fit()

    queue = algorithm.head.queue
    results = {
        'wrapper': type(trainer.state.model).__name__,
        'batchnorm_type': type(algorithm.head.head.projector[1]).__name__,
        'ids': recorder.ids,
        'losses': recorder.losses,
        'gradients': recorder.gradients,
        'queue': {name: buffer.clone() for name, buffer in queue.named_buffers()},
        'target_projector': {
            name: tensor.clone() for name, tensor in algorithm.head.head.target_projector.state_dict().items()
        },
    }
    trainer.close()
    return results


def classifier_error(device_batch_size: int) -> str | None:
    """Train a ViT classifier with a trainable 10-class head in 'replace' mode for one batch.

    Return the ValueError message that ContrastiveTuning raises at FIT_START under DDP, or None if the batch trained.
    """
    torch.manual_seed(0)
    vit = timm.create_model(
        'vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
    )
    model = ComposerClassifier(module=vit, num_classes=10)
    generator = torch.Generator().manual_seed(2)
    dataset = TensorDataset(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator), torch.arange(GLOBAL_BATCH) % 10)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(dataset, batch_size=device_batch_size, sampler=dist.get_sampler(dataset)),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        max_duration='1ba',
        algorithms=[ContrastiveTuning(proj_hidden_dim=16, pred_hidden_dim=16, out_dim=8, queue_size=GLOBAL_BATCH)],
        **trainer_kwargs(),
    )
    try:
        trainer.fit()
    except ValueError as error:
        return str(error)
    finally:
        trainer.close()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', type=Path, help='folder for the rank{rank}.pt results')
    args = parser.parse_args()
    logging.basicConfig(format='%(name)s: %(message)s')
    logging.getLogger('composer_maect').setLevel(logging.INFO)

    world_size = dist.get_world_size()
    if GLOBAL_BATCH % world_size:
        parser.error(f'The global batch of {GLOBAL_BATCH} samples cannot be split over {world_size} ranks.')
    device_batch_size = GLOBAL_BATCH // world_size

    results = tune_and_record(device_batch_size)
    results.update(
        rank=dist.get_global_rank(),
        world_size=world_size,
        classifier_error=classifier_error(device_batch_size),
    )
    torch.save(results, args.out_dir / f'rank{dist.get_global_rank()}.pt')


if __name__ == '__main__':
    main()
