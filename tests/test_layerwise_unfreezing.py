"""LayerwiseUnfreezing and its functional core on tiny timm ViTs, with real Composer Trainers on CPU."""

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from composer import Callback, Trainer
from composer.callbacks import LRMonitor
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from composer.optim import MultiStepScheduler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_maect.algorithms import LayerwiseUnfreezing
from composer_maect.algorithms.layerwise_unfreezing import (
    find_vision_transformer,
    freeze_lower_layers,
    layer_decay_param_groups,
)
from composer_maect.models.mae import MAEModel
from composer_maect.models.vit import create_encoder

from .conftest import REPO, run_script_on_ranks

NUM_CLASSES = 10
DEPTH = 4

# The layer-decay table for depth 4, decay 0.5 and lr 1: block i gets 0.5^(4 - i), the stem 0.5^5, the final norm 1.
HAND_TABLE = {
    'stem': 1 / 32,
    'block0': 1 / 16,
    'block1': 1 / 8,
    'block2': 1 / 4,
    'block3': 1 / 2,
    'final': 1.0,
}


def tiny_encoder(**kwargs) -> nn.Module:
    return create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=DEPTH, **kwargs)


def tiny_classifier_vit(**kwargs) -> nn.Module:
    """A timm ViT with a learned pos_embed and a 10-class head."""
    return timm.create_model(
        'vit_tiny_patch16_224',
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=DEPTH,
        num_classes=NUM_CLASSES,
        **kwargs,
    )


def classifier_loader(num_batches: int = 4, batch_size: int = 4, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_batches * batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_batches * batch_size,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False, num_workers=0)


def make_trainer(model, optimizer, algorithm, **kwargs) -> Trainer:
    kwargs.setdefault('train_dataloader', classifier_loader())
    kwargs.setdefault('max_duration', '2ba')
    return Trainer(
        model=model,
        optimizers=optimizer,
        algorithms=[algorithm],
        device='cpu',
        precision='fp32',
        progress_bar=False,
        log_to_console=False,
        seed=17,
        **kwargs,
    )


def names_of(params, module: nn.Module) -> set[str]:
    by_id = {id(param): name for name, param in module.named_parameters()}
    return {by_id[id(param)] for param in params}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


class ModeRecorder(Callback):
    """Call ``model.train()`` at BATCH_START, after the algorithms ran, and record the modes seen at BEFORE_FORWARD."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.records: list[dict[str, bool]] = []

    def batch_start(self, state, logger):
        state.model.train()

    def before_forward(self, state, logger):
        self.records.append(
            {name: any(sub.training for sub in module.modules()) for name, module in self.modules.items()}
        )


class LossRecorder(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def batch_end(self, state, logger):
        self.losses.append(float(state.loss))


# ---------------------------------------------------------------------------------------------------------------------
# Functional core


def test_layer_decay_groups_hand_table():
    vit = tiny_encoder()
    groups = layer_decay_param_groups(vit, lr=1.0, layer_decay=0.5, weight_decay=0.05)

    block_decayed = ['attn.qkv.weight', 'attn.proj.weight', 'mlp.fc1.weight', 'mlp.fc2.weight']
    block_not_decayed = [
        'norm1.weight',
        'norm1.bias',
        'attn.qkv.bias',
        'attn.proj.bias',
        'norm2.weight',
        'norm2.bias',
        'mlp.fc1.bias',
        'mlp.fc2.bias',
    ]
    # create_encoder's pos_embed is a fixed table (requires_grad False), so it is in no group.
    expected = {
        'encoder.stem.decay': {'cls_token', 'patch_embed.proj.weight'},
        'encoder.stem.no_decay': {'patch_embed.proj.bias'},
        'encoder.final.no_decay': {'norm.weight', 'norm.bias'},
    }
    for i in range(DEPTH):
        expected[f'encoder.block{i}.decay'] = {f'blocks.{i}.{name}' for name in block_decayed}
        expected[f'encoder.block{i}.no_decay'] = {f'blocks.{i}.{name}' for name in block_not_decayed}

    assert [group['name'] for group in groups] == [
        'encoder.stem.decay',
        'encoder.stem.no_decay',
        *[f'encoder.block{i}.{kind}' for i in range(DEPTH) for kind in ('decay', 'no_decay')],
        'encoder.final.no_decay',
    ]
    for group in groups:
        layer, kind = group['name'].split('.')[1:]
        assert names_of(group['params'], vit) == expected[group['name']], group['name']
        assert group['lr'] == pytest.approx(HAND_TABLE[layer], rel=1e-12), group['name']
        assert group['weight_decay'] == (0.05 if kind == 'decay' else 0.0), group['name']


def test_layer_decay_groups_depth32_example():
    # ViT-H/14 has 32 blocks. The layer-decay lrs depend only on the depth, so a narrow ViT of that depth is enough.
    vit = timm.create_model(
        'vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=32, embed_dim=16, num_heads=2
    )
    groups = layer_decay_param_groups(vit, lr=4e-4, layer_decay=0.65, weight_decay=0.05)
    lrs = {group['name']: group['lr'] for group in groups}

    assert lrs['encoder.block31.decay'] == pytest.approx(2.6e-4, rel=1e-9)
    assert lrs['encoder.block16.decay'] == pytest.approx(4.06e-7, rel=1e-3)
    assert lrs['encoder.final.no_decay'] == pytest.approx(4e-4, rel=1e-12)
    assert lrs['encoder.stem.decay'] == pytest.approx(4e-4 * 0.65**33, rel=1e-9)


def test_layer_decay_groups_leave_out_frozen_and_head():
    vit = tiny_classifier_vit()
    freeze_lower_layers(vit, 2)
    groups = layer_decay_param_groups(vit, lr=1.0, layer_decay=0.5, weight_decay=0.1, prefix='backbone')
    grouped = set().union(*(names_of(group['params'], vit) for group in groups))

    assert [group['name'] for group in groups] == [
        'backbone.block2.decay',
        'backbone.block2.no_decay',
        'backbone.block3.decay',
        'backbone.block3.no_decay',
        'backbone.final.no_decay',
    ]
    assert not any(name.startswith(('blocks.0.', 'blocks.1.', 'patch_embed.', 'head.')) for name in grouped)
    assert 'cls_token' not in grouped
    assert 'pos_embed' not in grouped


def test_freeze_lower_layers_stem_and_blocks():
    vit = tiny_classifier_vit(reg_tokens=2)
    frozen = freeze_lower_layers(vit, 2)

    assert frozen == [vit.patch_embed, vit.norm_pre, vit.blocks[0], vit.blocks[1]]
    for name in ('cls_token', 'reg_token', 'pos_embed'):
        assert not getattr(vit, name).requires_grad, name
    for name, param in vit.named_parameters():
        should_train = not name.startswith(('patch_embed.', 'blocks.0.', 'blocks.1.', 'cls_token', 'reg_token', 'pos'))
        assert param.requires_grad == should_train, name


def test_freeze_lower_layers_zero_freezes_nothing():
    vit = tiny_classifier_vit()

    assert freeze_lower_layers(vit, 0) == []
    assert all(param.requires_grad for param in vit.parameters())


def test_freeze_lower_layers_all_keeps_head():
    vit = tiny_classifier_vit(global_pool='avg', fc_norm=True)
    frozen = freeze_lower_layers(vit, 'all')

    assert vit.head not in frozen
    assert vit.fc_norm in frozen
    assert vit.norm in frozen
    for name, param in vit.named_parameters():
        assert param.requires_grad == name.startswith('head.'), name


def test_freeze_lower_layers_depth_keeps_final_norm():
    vit = tiny_encoder()
    freeze_lower_layers(vit, DEPTH)

    trainable = {name for name, param in vit.named_parameters() if param.requires_grad}
    assert trainable == {'norm.weight', 'norm.bias'}


def test_find_vision_transformer_child_and_nested():
    vit = tiny_classifier_vit()
    assert find_vision_transformer(ComposerClassifier(module=vit, num_classes=NUM_CLASSES)) is vit

    encoder = tiny_encoder()
    mae = MAEModel(encoder, decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
    assert find_vision_transformer(mae) is encoder
    assert find_vision_transformer(encoder) is encoder


def test_find_vision_transformer_none():
    model = ComposerClassifier(module=nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), num_classes=3)

    with pytest.raises(ValueError, match=r'ComposerClassifier contains no timm VisionTransformer') as error:
        find_vision_transformer(model)
    assert 'module (Sequential)' in str(error.value)


def test_find_vision_transformer_two():
    model = nn.Module()
    model.online = nn.Module()
    model.online.vit = tiny_encoder()
    model.target = tiny_encoder()

    with pytest.raises(ValueError, match=r'Module contains 2 timm VisionTransformer') as error:
        find_vision_transformer(model)
    assert "'online.vit', 'target'" in str(error.value)


def test_functional_core_bad_input():
    vit = tiny_encoder()

    with pytest.raises(ValueError, match=r'Invalid num_frozen_blocks 5: it must be between 0 and the encoder depth 4'):
        freeze_lower_layers(vit, 5)
    with pytest.raises(ValueError, match=r"Invalid num_frozen_blocks 'half'"):
        freeze_lower_layers(vit, 'half')
    with pytest.raises(TypeError, match=r'Expected a timm VisionTransformer, got Linear'):
        freeze_lower_layers(nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match=r'Invalid layer_decay 0'):
        layer_decay_param_groups(vit, lr=1.0, layer_decay=0, weight_decay=0.0)
    with pytest.raises(ValueError, match=r'Invalid weight_decay -0.1'):
        layer_decay_param_groups(vit, lr=1.0, layer_decay=0.5, weight_decay=-0.1)
    assert all(param.requires_grad for name, param in vit.named_parameters() if name != 'pos_embed')


# ---------------------------------------------------------------------------------------------------------------------
# Constructor and INIT validation


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'layer_decay': 0}, r'Invalid layer_decay 0: it must be in \(0, 1\]'),
        ({'layer_decay': 1.5}, r'Invalid layer_decay 1.5'),
        ({'num_frozen_blocks': -1}, r'Invalid num_frozen_blocks -1: it must be between 0 and the encoder depth'),
        ({'num_frozen_blocks': 'half'}, r"Invalid num_frozen_blocks 'half'"),
        ({'num_frozen_blocks': True}, r'Invalid num_frozen_blocks True'),
        ({'lr': -1.0}, r'Invalid lr -1.0'),
        ({'weight_decay': float('nan')}, r'Invalid weight_decay nan'),
    ],
)
def test_constructor_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerwiseUnfreezing(**kwargs)


def test_init_rejects_more_blocks_than_depth():
    model = ComposerClassifier(module=tiny_classifier_vit(), num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    with pytest.raises(ValueError, match=r'Invalid num_frozen_blocks 5: it must be between 0 and the encoder depth 4'):
        make_trainer(model, optimizer, LayerwiseUnfreezing(num_frozen_blocks=5))


def test_init_rejects_model_without_vit():
    model = ComposerClassifier(
        module=nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, NUM_CLASSES)), num_classes=NUM_CLASSES
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    with pytest.raises(ValueError, match=r'ComposerClassifier contains no timm VisionTransformer'):
        make_trainer(model, optimizer, LayerwiseUnfreezing())


def test_init_rejects_two_vits():
    model = ComposerClassifier(module=nn.Sequential(tiny_classifier_vit(), nn.Identity()), num_classes=NUM_CLASSES)
    model.ema = tiny_encoder()
    optimizer = torch.optim.AdamW(model.module.parameters(), lr=1e-3)

    with pytest.raises(ValueError, match=r"2 timm VisionTransformer modules \('module.0', 'ema'\)"):
        make_trainer(model, optimizer, LayerwiseUnfreezing())


def test_init_rejects_ambiguous_default_lr():
    vit = tiny_classifier_vit()
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(
        [{'params': vit.blocks.parameters(), 'lr': 1e-3}, {'params': [*vit.norm.parameters(), *vit.head.parameters()]}],
        lr=2e-3,
    )

    with pytest.raises(ValueError, match=r'different values of learning rate \(\[0.001, 0.002\]\)\. Pass lr='):
        make_trainer(model, optimizer, LayerwiseUnfreezing())


def test_init_requires_lr_when_encoder_not_in_optimizer():
    vit = tiny_classifier_vit()
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(vit.head.parameters(), lr=1e-3)

    with pytest.raises(ValueError, match=r"No optimizer group contains the encoder's parameters.*Pass lr="):
        make_trainer(model, optimizer, LayerwiseUnfreezing())


def test_init_rejects_nothing_left_to_train():
    vit = tiny_classifier_vit()
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    encoder_params = [param for name, param in vit.named_parameters() if not name.startswith('head.')]
    optimizer = torch.optim.AdamW(encoder_params, lr=1e-3)

    with pytest.raises(ValueError, match=r"num_frozen_blocks='all' the optimizer has no parameters left to train"):
        make_trainer(model, optimizer, LayerwiseUnfreezing(num_frozen_blocks='all'))


def test_torch_scheduler_built_before_trainer_is_rejected():
    model = ComposerClassifier(module=tiny_classifier_vit(), num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = make_trainer(model, optimizer, LayerwiseUnfreezing(layer_decay=0.5), schedulers=scheduler)

    with pytest.raises(ValueError, match=r'LambdaLR has 1 base learning rates that do not match the optimizer'):
        trainer.fit()


# ---------------------------------------------------------------------------------------------------------------------
# Training with a real Trainer


def test_trainer_freezes_lower_half_and_trains_upper():
    torch.manual_seed(0)
    vit = tiny_classifier_vit()
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    before = snapshot(vit)
    recorder = ModeRecorder(
        {'patch_embed': vit.patch_embed, 'block0': vit.blocks[0], 'block1': vit.blocks[1], 'block2': vit.blocks[2]}
    )
    in_memory = InMemoryLogger()
    # Two epochs of two batches, so the Trainer's model.train() at the second epoch start is covered too.
    trainer = make_trainer(
        model,
        optimizer,
        LayerwiseUnfreezing(),
        train_dataloader=classifier_loader(num_batches=2),
        max_duration='2ep',
        callbacks=[recorder],
        loggers=[in_memory],
    )
    trainer.fit()

    frozen_prefixes = ('patch_embed.', 'blocks.0.', 'blocks.1.', 'cls_token', 'pos_embed')
    for name, param in vit.named_parameters():
        if name.startswith(frozen_prefixes):
            assert not param.requires_grad, name
            assert torch.equal(param, before[name]), f'frozen {name} changed'
        else:
            assert param.requires_grad, name
            assert not torch.equal(param, before[name]), f'trainable {name} did not change'

    assert len(recorder.records) == 4
    for record in recorder.records:
        assert record == {'patch_embed': False, 'block0': False, 'block1': False, 'block2': True}

    # Group 0 is the original group, left with the classifier head. The encoder groups inherit its betas.
    groups = optimizer.param_groups
    assert names_of(groups[0]['params'], vit) == {'head.weight', 'head.bias'}
    assert groups[0]['weight_decay'] == 0.05
    assert [group.get('name') for group in groups[1:]] == [
        'encoder.block2.decay',
        'encoder.block2.no_decay',
        'encoder.block3.decay',
        'encoder.block3.no_decay',
        'encoder.final.no_decay',
    ]
    assert all(group['betas'] == (0.9, 0.95) for group in groups)

    frozen_count = sum(p.numel() for n, p in vit.named_parameters() if n.startswith(frozen_prefixes))
    trainable_count = sum(p.numel() for n, p in vit.named_parameters() if not n.startswith((*frozen_prefixes, 'head')))
    assert in_memory.data['layerwise_unfreezing/frozen_params'][0][1] == frozen_count
    assert in_memory.data['layerwise_unfreezing/trainable_params'][0][1] == trainable_count


def test_trainer_all_frozen_trains_only_head():
    torch.manual_seed(0)
    vit = tiny_classifier_vit()
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-5)
    before = snapshot(vit)
    recorder = ModeRecorder(dict(vit.named_children()))
    trainer = make_trainer(model, optimizer, LayerwiseUnfreezing(num_frozen_blocks='all'), callbacks=[recorder])
    trainer.fit()

    for name, param in vit.named_parameters():
        if name.startswith('head.'):
            assert not torch.equal(param, before[name]), f'head {name} did not change'
        else:
            assert torch.equal(param, before[name]), f'frozen {name} changed'
    assert len(optimizer.param_groups) == 1
    assert names_of(optimizer.param_groups[0]['params'], vit) == {'head.weight', 'head.bias'}
    assert len(recorder.records) == 2
    for record in recorder.records:
        assert record == {name: name in ('head_drop', 'head') for name in record}


def test_trainer_nested_vit_keeps_decoder_group():
    torch.manual_seed(0)
    encoder = tiny_encoder()
    model = MAEModel(encoder, mask_ratio=0.5, decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
    decoder_params = list(model.decoder.parameters())
    optimizer = torch.optim.AdamW(
        [
            {'params': model.encoder.parameters(), 'lr': 1e-3, 'weight_decay': 0.05},
            {'params': decoder_params, 'lr': 5e-4, 'weight_decay': 1e-5, 'name': 'decoder'},
        ]
    )
    encoder_before = snapshot(encoder)
    decoder_before = snapshot(model.decoder)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    trainer = make_trainer(
        model,
        optimizer,
        LayerwiseUnfreezing(num_frozen_blocks=3, layer_decay=0.5),
        train_dataloader=DataLoader(images, batch_size=4),
    )
    trainer.fit()

    decoder_group = optimizer.param_groups[0]
    assert decoder_group['name'] == 'decoder'
    assert decoder_group['params'] == decoder_params
    assert decoder_group['weight_decay'] == 1e-5
    # Without a scheduler, every group keeps the lr it was given.
    lrs = {group['name']: group['lr'] for group in optimizer.param_groups}
    assert lrs['decoder'] == 5e-4
    assert lrs['encoder.block3.decay'] == pytest.approx(1e-3 * 0.5, rel=1e-12)
    assert lrs['encoder.final.no_decay'] == pytest.approx(1e-3, rel=1e-12)
    assert not any(name.startswith('encoder.block2') for name in lrs)
    for name, param in encoder.named_parameters():
        changed = not torch.equal(param, encoder_before[name])
        assert changed == name.startswith(('blocks.3.', 'norm.')), name
    for name, param in model.decoder.named_parameters():
        # The decoder's fixed sin-cos position table is the one parameter without gradients.
        assert torch.equal(param, decoder_before[name]) != param.requires_grad, name


def test_trainer_optimizer_with_param_names():
    vit = tiny_classifier_vit()
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    make_trainer(model, optimizer, LayerwiseUnfreezing(layer_decay=0.5))

    parameters = dict(model.named_parameters())
    for group in optimizer.param_groups:
        assert len(group['param_names']) == len(group['params'])
        for name, param in zip(group['param_names'], group['params'], strict=True):
            assert parameters[name] is param
    assert optimizer.param_groups[0]['param_names'] == ['module.head.weight', 'module.head.bias']


def test_scheduler_multiplier_applies_per_group():
    vit = tiny_classifier_vit()
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    in_memory = InMemoryLogger()
    trainer = make_trainer(
        model,
        optimizer,
        LayerwiseUnfreezing(num_frozen_blocks=1, layer_decay=0.5),
        max_duration='3ba',
        schedulers=MultiStepScheduler(milestones=['2ba'], gamma=0.1),
        callbacks=[LRMonitor()],
        loggers=[in_memory],
    )
    trainer.fit()

    # Composer steps the scheduler at the end of each batch, before the batch count advances, so LRMonitor logs
    # the multipliers for 0, 1 and 2 completed batches: 1, 1 and 0.1.
    multipliers = [1.0, 1.0, 0.1]
    expected_scales = [1.0] + [HAND_TABLE[f'block{i}'] for i in (1, 2, 3) for _ in range(2)] + [1.0]
    assert [group.get('name') for group in optimizer.param_groups] == [
        None,
        'encoder.block1.decay',
        'encoder.block1.no_decay',
        'encoder.block2.decay',
        'encoder.block2.no_decay',
        'encoder.block3.decay',
        'encoder.block3.no_decay',
        'encoder.final.no_decay',
    ]
    for index, scale in enumerate(expected_scales):
        logged = [value for _, value in in_memory.data[f'lr-AdamW/group{index}']]
        assert logged == pytest.approx([1e-3 * scale * m for m in multipliers], rel=1e-9), f'group {index}'


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_state_dict_holds_resolved_primitives():
    model = ComposerClassifier(module=tiny_classifier_vit(), num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    algorithm = LayerwiseUnfreezing()
    assert algorithm.state_dict()['depth'] is None

    make_trainer(model, optimizer, algorithm)

    assert algorithm.state_dict() == {
        'num_frozen_blocks': 2,
        'layer_decay': 0.65,
        'lr': 2e-3,
        'weight_decay': 0.05,
        'depth': DEPTH,
    }


def resumable_run(save_folder: Path, max_duration: str, algorithm: LayerwiseUnfreezing, **kwargs):
    torch.manual_seed(0)
    vit = tiny_classifier_vit()
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = LossRecorder()
    trainer = make_trainer(
        model,
        optimizer,
        algorithm,
        train_dataloader=classifier_loader(num_batches=6),
        max_duration=max_duration,
        schedulers=MultiStepScheduler(milestones=['2ba'], gamma=0.5),
        callbacks=[losses],
        run_name='layerwise-resume',
        save_folder=str(save_folder),
        save_interval='1ba',
        **kwargs,
    )
    return trainer, model, optimizer, losses


def test_resumption_matches_uninterrupted_run(tmp_path):
    reference, reference_model, _, reference_losses = resumable_run(
        tmp_path / 'reference', '3ba', LayerwiseUnfreezing(layer_decay=0.5)
    )
    reference.fit()
    reference.close()

    first, _, _, first_losses = resumable_run(tmp_path / 'run', '2ba', LayerwiseUnfreezing(layer_decay=0.5))
    first.fit()
    first.close()
    assert first_losses.losses == reference_losses.losses[:2]

    resumed, resumed_model, optimizer, resumed_losses = resumable_run(
        tmp_path / 'run', '3ba', LayerwiseUnfreezing(layer_decay=0.5), autoresume=True
    )
    assert resumed.state.timestamp.batch.value == 2
    assert len(optimizer.state) == sum(len(group['params']) for group in optimizer.param_groups)
    resumed.fit()
    resumed.close()

    assert resumed_losses.losses == [reference_losses.losses[2]]
    reference_weights = reference_model.state_dict()
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, reference_weights[name]), name

    with pytest.raises(ValueError, match=r'other LayerwiseUnfreezing settings \(layer_decay: checkpoint 0.5, this'):
        resumable_run(
            tmp_path / 'other',
            '3ba',
            LayerwiseUnfreezing(layer_decay=0.7),
            load_path=str(tmp_path / 'run' / 'latest-rank0.pt'),
        )


def test_load_state_dict_names_every_difference():
    model = ComposerClassifier(module=tiny_classifier_vit(), num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    algorithm = LayerwiseUnfreezing(num_frozen_blocks=1)
    make_trainer(model, optimizer, algorithm)
    saved = dict(algorithm.state_dict(), num_frozen_blocks=2, weight_decay=0.1)

    with pytest.raises(ValueError) as error:
        algorithm.load_state_dict(saved)
    assert 'num_frozen_blocks: checkpoint 2, this run 1' in str(error.value)
    assert 'weight_decay: checkpoint 0.1, this run 0.05' in str(error.value)
    algorithm.load_state_dict(algorithm.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# Two processes under Composer's launcher


def run_two_ranks(tmp_path: Path, mode: str) -> list[dict]:
    """Run the script on two gloo ranks on 127.0.0.1 and return each rank's results."""
    out_dir = tmp_path / mode
    out_dir.mkdir()
    script = REPO / 'tests' / 'scripts' / 'layerwise_unfreezing_run.py'
    fsdp_version = '2' if mode == 'fsdp2' else None
    run_script_on_ranks(script, out_dir, 2, '--mode', mode, fsdp_version=fsdp_version, cwd=tmp_path)
    return [json.loads((out_dir / f'rank{rank}.json').read_text()) for rank in range(2)]


def check_two_rank_results(results: list[dict]) -> None:
    expected_groups = [
        ('', 1e-3, 0.05),
        ('encoder.block2.decay', 1e-3 / 4, 0.05),
        ('encoder.block2.no_decay', 1e-3 / 4, 0.0),
        ('encoder.block3.decay', 1e-3 / 2, 0.05),
        ('encoder.block3.no_decay', 1e-3 / 2, 0.0),
        ('encoder.final.no_decay', 1e-3, 0.0),
    ]
    for rank, result in enumerate(results):
        assert result['rank'] == rank
        assert result['world_size'] == 2
        groups = [(group['name'], group['initial_lr'], group['weight_decay']) for group in result['param_groups']]
        assert [name for name, _, _ in groups] == [name for name, _, _ in expected_groups]
        for (name, lr, weight_decay), (_, expected_lr, expected_wd) in zip(groups, expected_groups, strict=True):
            assert lr == pytest.approx(expected_lr, rel=1e-12), name
            assert weight_decay == expected_wd, name
        # The script's MultiStepScheduler multiplier is 0.1 after the third batch.
        for group in result['param_groups']:
            assert group['lr'] == pytest.approx(0.1 * group['initial_lr'], rel=1e-9), group['name']
        assert result['frozen_changed'] == []
        assert result['trainable_unchanged'] == []
        # 12 tensors per block, then the patch_embed weight and bias, cls_token and the learned pos_embed.
        assert len(result['frozen']) == 2 * 12 + 4
        assert result['frozen_modes'] == [False] * 3
        assert len(result['losses']) == 3
        assert all(math.isfinite(loss) for loss in result['losses'])
    # Each rank trains on its own samples, so the losses differ while the synchronised weights agree.
    assert results[0]['losses'] != results[1]['losses']
    assert results[0]['weights_checksum'] == results[1]['weights_checksum']


def test_ddp_two_processes(tmp_path):
    results = run_two_ranks(tmp_path, 'ddp')
    check_two_rank_results(results)
    assert all(result['wrapper'] == 'DistributedDataParallel' for result in results)


def test_fsdp2_two_processes(tmp_path):
    results = run_two_ranks(tmp_path, 'fsdp2')
    check_two_rank_results(results)
    assert all(result['fsdp_config'] == 'FSDP2Config' for result in results)
    assert all(result['block_param_type'] == 'DTensor' for result in results)
