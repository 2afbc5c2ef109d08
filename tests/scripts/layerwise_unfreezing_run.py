"""Train a tiny ViT classifier for 3 batches with LayerwiseUnfreezing on 2 CPU ranks, and write per-rank results.

Usage::

    composer -n 2 tests/scripts/layerwise_unfreezing_run.py OUT_DIR --mode ddp
    FSDP_VERSION=2 composer -n 2 tests/scripts/layerwise_unfreezing_run.py OUT_DIR --mode fsdp2

Each rank writes ``OUT_DIR/rank{rank}.json`` with the optimizer groups, the frozen parameters, whether any of them
changed, the modes of the frozen modules at each forward pass, the losses and a checksum of all weights.
``fsdp2`` passes ``parallelism_config={'fsdp': {...}}``, which Composer turns into FSDP2 when ``FSDP_VERSION=2``;
without it Composer would pick FSDP1, which needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import timm
import torch
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from composer.optim import MultiStepScheduler
from composer.utils import dist
from timm.models.vision_transformer import Block
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from composer_maect.algorithms import LayerwiseUnfreezing

NUM_CLASSES = 10
BATCHES = 3
DEVICE_BATCH_SIZE = 4
WORLD_SIZE = 2


class FrozenModeRecorder(Callback):
    """Record at each BEFORE_FORWARD whether any frozen module, or any of its submodules, is in training mode."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.modes: list[bool] = []

    def before_forward(self, state, logger):
        self.modes.append(any(sub.training for module in self.modules for sub in module.modules()))


class LossRecorder(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def batch_end(self, state, logger):
        self.losses.append(float(state.loss))


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """Return the whole parameter. FSDP2 shards it as a DTensor, and every rank must join its gather."""
    tensor = param.full_tensor() if isinstance(param, DTensor) else param
    return tensor.detach().clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', type=Path, help='folder for the rank{rank}.json results')
    parser.add_argument('--mode', choices=('ddp', 'fsdp2'), required=True, help='the data-parallel wrapper')
    args = parser.parse_args()
    if args.mode == 'fsdp2' and os.environ.get('FSDP_VERSION') != '2':
        parser.error('--mode fsdp2 needs the environment variable FSDP_VERSION=2.')
    logging.basicConfig(format='%(name)s: %(message)s')
    logging.getLogger('composer_maect').setLevel(logging.INFO)

    # The same seed on every rank gives identical initial weights.
    torch.manual_seed(0)
    vit = timm.create_model(
        'vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=4, num_classes=NUM_CLASSES
    )
    # Composer's FSDP looks this up on the ComposerModel's direct child, here the ViT, and shards each block alone.
    vit.fsdp_wrap_fn = lambda module: isinstance(module, Block)
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}

    generator = torch.Generator().manual_seed(1)
    num_samples = BATCHES * DEVICE_BATCH_SIZE * WORLD_SIZE
    dataset = TensorDataset(
        torch.randn(num_samples, 3, 32, 32, generator=generator),
        torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator),
    )
    loader = DataLoader(dataset, batch_size=DEVICE_BATCH_SIZE, sampler=dist.get_sampler(dataset, shuffle=False))

    mode_recorder = FrozenModeRecorder([vit.patch_embed, vit.blocks[0], vit.blocks[1]])
    loss_recorder = LossRecorder()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=optimizer,
        # The multiplier drops to 0.1 once 2 batches are done, so the final lr of each group is 0.1 × its initial lr.
        schedulers=MultiStepScheduler(milestones=['2ba'], gamma=0.1),
        max_duration=f'{BATCHES}ba',
        algorithms=[LayerwiseUnfreezing(layer_decay=0.5)],
        callbacks=[mode_recorder, loss_recorder],
        parallelism_config={'fsdp': {'mixed_precision': 'FULL'}} if args.mode == 'fsdp2' else None,
        device='cpu',
        precision='fp32',
        progress_bar=False,
        log_to_console=False,
        seed=0,
    )
    trainer.fit()

    frozen, frozen_changed, trainable_unchanged = [], [], []
    checksum = 0.0
    for name, param in model.named_parameters():
        value = full_tensor(param)
        checksum += float(value.double().sum())
        changed = not torch.equal(value, initial[name])
        if param.requires_grad:
            if not changed:
                trainable_unchanged.append(name)
        else:
            frozen.append(name)
            if changed:
                frozen_changed.append(name)

    results = {
        'rank': dist.get_global_rank(),
        'world_size': dist.get_world_size(),
        'wrapper': type(trainer.state.model).__name__,
        'fsdp_config': type(trainer.state.fsdp_config).__name__ if trainer.state.fsdp_config is not None else None,
        'block_param_type': type(vit.blocks[3].attn.qkv.weight).__name__,
        'param_groups': [
            {
                'name': group.get('name', ''),
                'initial_lr': group['initial_lr'],
                'lr': group['lr'],
                'weight_decay': group['weight_decay'],
                'num_tensors': len(group['params']),
            }
            for group in optimizer.param_groups
        ],
        'frozen': frozen,
        'frozen_changed': frozen_changed,
        'trainable_unchanged': trainable_unchanged,
        'frozen_modes': mode_recorder.modes,
        'losses': loss_recorder.losses,
        'weights_checksum': checksum,
    }
    trainer.close()
    path = args.out_dir / f'rank{dist.get_global_rank()}.json'
    path.write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
