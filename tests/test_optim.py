import math

import pytest
import timm
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

from composer_maect.optim import build_adamw, build_scheduler, param_groups_weight_decay, scaled_lr


def test_scaled_lr_conventions():
    assert scaled_lr(1.5e-4, 1024, 2, 'images') == pytest.approx(6e-4)
    assert scaled_lr(1.5e-4, 1024, 2, 'views') == pytest.approx(1.2e-3)
    assert scaled_lr(1e-4, 512, 2, 'views') == pytest.approx(4e-4)
    assert scaled_lr(1e-3, 999, 2, 'none') == 1e-3
    with pytest.raises(ValueError, match='lr_scaling'):
        scaled_lr(1e-3, 256, 1, 'batch')


def test_weight_decay_exclusions():
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=0)
    vit.blocks[0].requires_grad_(False)
    groups = param_groups_weight_decay(vit.named_parameters(), 0.05)
    names = {id(p): n for n, p in vit.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]['params']}
    undecayed = {names[id(p)] for p in groups[1]['params']}
    assert groups[0]['weight_decay'] == 0.05
    assert groups[1]['weight_decay'] == 0.0
    assert 'cls_token' in decayed
    assert 'blocks.1.attn.qkv.weight' in decayed
    assert 'blocks.1.attn.qkv.bias' in undecayed
    assert 'blocks.1.norm1.weight' in undecayed
    assert 'norm.weight' in undecayed
    assert not any(name.startswith('blocks.0.') for name in decayed | undecayed)


def test_adamw_rejects_frozen_model():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match='no trainable parameters'):
        build_adamw(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def test_scheduler_rejects_fraction_above_one():
    with pytest.raises(ValueError, match=r'in \[0, 1\)'):
        build_scheduler(1.5)


def _lr_trace(warmup, batches=10):
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    optimizer = build_adamw(model, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    data = TensorDataset(torch.randn(batches * 2, 4), torch.randint(0, 2, (batches * 2,)))
    logger = InMemoryLogger()
    from composer.callbacks import LRMonitor

    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=2),
        optimizers=optimizer,
        schedulers=build_scheduler(warmup),
        step_schedulers_every_batch=True,
        max_duration=f'{batches}ba',
        callbacks=[LRMonitor()],
        loggers=[logger],
        device='cpu',
        progress_bar=False,
    )
    trainer.fit()
    trainer.close()
    return [value for _, value in logger.data['lr-AdamW/group0']]


def test_warmup_fraction_then_cosine():
    trace = _lr_trace(0.2)
    assert trace[0] == pytest.approx(0.0)
    assert trace[1] == pytest.approx(0.05)
    assert trace[2] == pytest.approx(0.1)
    for step in range(2, 10):
        assert trace[step] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 8)))


def test_warmup_as_time_string_and_zero():
    assert _lr_trace('2ba') == pytest.approx(_lr_trace(0.2))
    assert _lr_trace(0.0)[0] == pytest.approx(0.1)
