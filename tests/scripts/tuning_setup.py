"""The tiny ViT tuning setup that ``contrastive_tuning_run.py`` and ``fsdp_tuning_run.py`` share.

The global batch is 8 samples whatever the number of ranks. Every input is a fixed tensor: the dataset stores both
views of each sample, the sampler does not shuffle, the queue lookup takes the nearest neighbour (topk 1) and the ViT
has no dropout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

from composer_maect.algorithms import ContrastiveTuning
from composer_maect.models.encoder_model import ViTEncoderModel
from composer_maect.models.vit import create_encoder

GLOBAL_BATCH = 8
NUM_CLASSES = 3


class FixedViews(Dataset):
    """Samples ``{'view0', 'view1', 'index', 'label'}`` drawn once from a seeded generator, the same on every rank."""

    def __init__(self, num_samples: int, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        self.view0 = torch.randn(num_samples, 3, 32, 32, generator=generator)
        self.view1 = torch.randn(num_samples, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            'view0': self.view0[index],
            'view1': self.view1[index],
            'index': torch.tensor(index),
            'label': self.labels[index],
        }


class TuningParts(NamedTuple):
    """The model, optimizer, loader and algorithm that every tuning trainer of the scripts starts from."""

    model: ViTEncoderModel
    optimizer: torch.optim.SGD
    loader: DataLoader
    algorithm: ContrastiveTuning


def trainer_kwargs() -> dict:
    """Return the Trainer arguments every trainer of the scripts shares: CPU, float32, seed 0, no console output."""
    return {'device': 'cpu', 'precision': 'fp32', 'progress_bar': False, 'log_to_console': False, 'seed': 0}


def build_tuning(device_batch_size: int, batches: int) -> TuningParts:
    """Build the 4-block ViT, its optimizer, a loader of ``batches`` global batches and the ContrastiveTuning."""
    # The same seed on every rank and in every trainer gives identical initial weights.
    torch.manual_seed(0)
    encoder = create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=4)
    model = ViTEncoderModel(encoder)
    # SGD keeps the update linear in the gradient, so small float differences between the runs stay small.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)

    dataset = FixedViews(batches * GLOBAL_BATCH)
    loader = DataLoader(dataset, batch_size=device_batch_size, sampler=dist.get_sampler(dataset, shuffle=False))

    algorithm = ContrastiveTuning(
        proj_hidden_dim=32,
        pred_hidden_dim=64,
        out_dim=16,
        queue_size=2 * GLOBAL_BATCH,
        topk=1,
        temperature=0.2,
        target_momentum=0.9,
    )
    return TuningParts(model, optimizer, loader, algorithm)
