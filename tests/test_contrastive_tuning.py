"""ContrastiveTuning on tiny timm ViTs with real Composer Trainers on the CPU, in one process and under `composer -n 2`.

The ViT-H/14 test at the end is marked slow: it runs one tuning step of the full-size model.
"""

import math
import resource
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import timm
import torch
from composer import Callback, Trainer
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from composer_maect.algorithms import ContrastiveHead, ContrastiveTuning, LayerwiseUnfreezing
from composer_maect.models.encoder_model import ViTEncoderModel
from composer_maect.models.global_batchnorm import GlobalBatchNorm1d
from composer_maect.models.vit import create_encoder

from .conftest import REPO, run_script_on_ranks

NUM_CLASSES = 10
DEPTH = 4
BATCH_SIZE = 4
HEAD_DIMS = {'proj_hidden_dim': 32, 'pred_hidden_dim': 64, 'out_dim': 16}


def tiny_encoder() -> nn.Module:
    return create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=DEPTH)


def tiny_classifier_vit() -> nn.Module:
    """A timm ViT with a 10-class head, as a user would wrap it in ComposerClassifier."""
    return timm.create_model(
        'vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=DEPTH, num_classes=NUM_CLASSES
    )


def classifier_loader(num_samples: int = 16, seed: int = 0) -> DataLoader:
    """(image, label) tuples, one view per image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_samples, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZE, shuffle=False)


class DictDataset(Dataset):
    """Fixed images as dict samples with the chosen keys.

    ``view0`` is the image, ``view1`` its mirror image, ``image`` the single view, ``index`` the sample id and
    ``label`` a class, or the sample id itself with ``label_is_index``.
    """

    def __init__(self, num_samples: int, keys: tuple[str, ...], *, label_is_index: bool = False, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(num_samples, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
        if label_is_index:
            self.labels = torch.arange(num_samples)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {
            'view0': self.images[index],
            'view1': self.images[index].flip(-1),
            'image': self.images[index],
            'pixels': self.images[index],
            'index': torch.tensor(index),
            'label': self.labels[index],
        }
        return {key: sample[key] for key in self.keys}


def dict_loader(num_samples: int, keys: tuple[str, ...], **kwargs) -> DataLoader:
    return DataLoader(DictDataset(num_samples, keys, **kwargs), batch_size=BATCH_SIZE, shuffle=False)


def make_trainer(model, optimizer, algorithms, train_dataloader, **kwargs) -> Trainer:
    kwargs.setdefault('max_duration', '4ba')
    return Trainer(
        model=model,
        optimizers=optimizer,
        algorithms=algorithms,
        train_dataloader=train_dataloader,
        device='cpu',
        precision='fp32',
        progress_bar=False,
        log_to_console=False,
        seed=17,
        **kwargs,
    )


def encoder_trainer(algorithms, train_dataloader, **kwargs):
    """Return a Trainer for ViTEncoderModel on a tiny ViT, the model and its optimizer."""
    torch.manual_seed(0)
    model = ViTEncoderModel(tiny_encoder())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return make_trainer(model, optimizer, algorithms, train_dataloader, **kwargs), model, optimizer


def logged(logger: InMemoryLogger, key: str) -> list[float]:
    return [float(value) for _, value in logger.data.get(key, [])]


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


class LossRecorder(Callback):
    def __init__(self):
        self.losses: list[dict[str, float]] = []

    def batch_end(self, state, logger):
        self.losses.append({key: float(value) for key, value in state.loss.items()})


# ---------------------------------------------------------------------------------------------------------------------
# A stock ComposerClassifier with (image, label) batches


class ClassifierRun(NamedTuple):
    model: ComposerClassifier
    optimizer: torch.optim.Optimizer
    algorithm: ContrastiveTuning
    in_memory: InMemoryLogger
    losses: LossRecorder
    initial: dict[str, torch.Tensor]
    loader: DataLoader


def classifier_run(**algorithm_kwargs) -> ClassifierRun:
    """Tune a ComposerClassifier on 4 batches of (image, label) tuples with ContrastiveTuning alone."""
    torch.manual_seed(0)
    vit = tiny_classifier_vit()
    model = ComposerClassifier(module=vit, num_classes=NUM_CLASSES)
    # No weight decay, so a parameter without gradient stays exactly as it was.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    algorithm = ContrastiveTuning(queue_size=2 * BATCH_SIZE, **HEAD_DIMS, **algorithm_kwargs)
    in_memory = InMemoryLogger()
    losses = LossRecorder()
    loader = classifier_loader()
    trainer = make_trainer(model, optimizer, [algorithm], loader, loggers=[in_memory], callbacks=[losses])
    initial = snapshot(vit)
    trainer.fit()
    trainer.close()
    return ClassifierRun(model, optimizer, algorithm, in_memory, losses, initial, loader)


def test_classifier_replace_mode_fills_queue():
    model, optimizer, algorithm, in_memory, losses, initial, loader = classifier_run()

    assert isinstance(model.maect_head, ContrastiveHead)
    assert algorithm.head is model.maect_head
    assert isinstance(model.maect_head.head.projector[1], GlobalBatchNorm1d)
    head_groups = [group for group in optimizer.param_groups if group.get('name', '').startswith('head.')]
    head_params = {id(param) for param in model.maect_head.parameters() if param.requires_grad}
    assert {id(param) for group in head_groups for param in group['params']} == head_params

    # The queue of 8 entries takes two batches of 4 to fill.
    assert logged(in_memory, 'maect/queue_fill') == [0.5, 1.0, 1.0, 1.0]
    accuracy = logged(in_memory, 'maect/nn_accuracy')
    assert len(accuracy) == 4
    # Before the first enqueue the queue has only unlabelled random entries, so no neighbour counts.
    assert math.isnan(accuracy[0])
    assert all(0.0 <= value <= 1.0 for value in accuracy[1:])

    nnclr = logged(in_memory, 'loss/train/nnclr')
    assert len(nnclr) == 4
    assert all(math.isfinite(value) for value in nnclr)
    assert logged(in_memory, 'loss/train/total') == nnclr
    assert 'loss/train/model' not in in_memory.data
    assert [set(step) for step in losses.losses] == [{'nnclr', 'total'}] * 4

    # The queue contains the labels of the last two batches. The tuples carry no sample ids.
    queue = model.maect_head.queue
    labels = torch.cat([batch[1] for batch in loader])
    assert torch.equal(queue.queue_labels, labels[-8:])
    assert torch.equal(queue.queue_ids, torch.full((8,), -1))

    # Only the NNCLR loss trains: the classifier gets no gradient, the encoder does.
    vit = model.module
    final = snapshot(vit)
    assert torch.equal(final['head.weight'], initial['head.weight'])
    assert not torch.equal(final['blocks.3.mlp.fc1.weight'], initial['blocks.3.mlp.fc1.weight'])


def test_classifier_add_mode_logs_weighted_total():
    run = classifier_run(loss_mode='add', loss_weight=0.5)
    in_memory = run.in_memory

    model_loss = logged(in_memory, 'loss/train/model')
    nnclr = logged(in_memory, 'loss/train/nnclr')
    total = logged(in_memory, 'loss/train/total')
    assert len(model_loss) == len(nnclr) == len(total) == 4
    for step, (base, contrastive, combined) in enumerate(zip(model_loss, nnclr, total, strict=True)):
        assert combined == pytest.approx(base + 0.5 * contrastive, rel=1e-6), step
    # With ten classes the untrained classifier's cross-entropy is near log(10).
    assert model_loss[0] == pytest.approx(math.log(NUM_CLASSES), rel=0.3)
    assert logged(in_memory, 'maect/queue_fill')[-1] == 1.0
    assert [set(step) for step in run.losses.losses] == [{'model', 'nnclr', 'total'}] * 4

    # Now the classifier's own loss trains its head too.
    assert not torch.equal(run.model.module.head.weight.detach(), run.initial['head.weight'])


# ---------------------------------------------------------------------------------------------------------------------
# Own-id exclusion with dict batches and ViTEncoderModel


def spy_on_lookups(monkeypatch, algorithm: ContrastiveTuning) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Record ``(query ids, ids of the chosen neighbours, ids in the queue)`` for every lookup of the queue."""
    queue = algorithm.head.queue
    lookup = queue.find_nn
    records = []

    def recording_find_nn(z_normalized, ids=None, topk=1, **kwargs):
        neighbours, index = lookup(z_normalized, ids, topk, **kwargs)
        records.append((ids.clone(), queue.queue_ids[index].clone(), queue.queue_ids.clone()))
        return neighbours, index

    monkeypatch.setattr(queue, 'find_nn', recording_find_nn)
    return records


def test_sample_is_never_its_own_neighbour(monkeypatch):
    # view1 mirrors view0 and the label is the sample id, so nn_accuracy is the fraction of samples whose neighbour
    # is an earlier copy of themselves. The queue contains exactly the 8 samples of the last epoch.
    keys = ('view0', 'view1', 'index', 'label')
    algorithm = ContrastiveTuning(queue_size=8, topk=1, **HEAD_DIMS)
    in_memory = InMemoryLogger()
    trainer, _, _ = encoder_trainer(
        [algorithm], dict_loader(8, keys, label_is_index=True), max_duration='3ep', loggers=[in_memory]
    )
    records = spy_on_lookups(monkeypatch, algorithm)
    trainer.fit()
    trainer.close()

    assert len(records) == 2 * 6  # two views in each of 6 batches
    own_id_in_queue = 0
    for step, (ids, neighbour_ids, queue_ids) in enumerate(records):
        assert not (neighbour_ids == ids).any(), f'lookup {step}: ids {ids} got neighbours {neighbour_ids}'
        own_id_in_queue += int(torch.isin(ids, queue_ids).sum())
    # From the second epoch on, every sample's earlier copy is in the queue.
    assert own_id_in_queue == 2 * 4 * 4

    accuracy = logged(in_memory, 'maect/nn_accuracy')
    assert math.isnan(accuracy[0])
    assert accuracy[1:] == [0.0] * 5


def test_without_ids_sample_finds_itself():
    # The control for the test above: without 'index' nothing is excluded, and the earlier copy wins.
    keys = ('view0', 'view1', 'label')
    algorithm = ContrastiveTuning(queue_size=8, topk=1, **HEAD_DIMS)
    in_memory = InMemoryLogger()
    trainer, _, _ = encoder_trainer(
        [algorithm], dict_loader(8, keys, label_is_index=True), max_duration='3ep', loggers=[in_memory]
    )
    trainer.fit()
    trainer.close()

    assert max(logged(in_memory, 'maect/nn_accuracy')[2:]) == 1.0
    assert torch.equal(algorithm.head.queue.queue_ids, torch.full((8,), -1))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'queue_size': 8, 'topk': 9}, r'topk must be between 1 and queue_size \(8\), got 9'),
        ({'topk': 0}, r'topk must be between 1 and queue_size \(65536\), got 0'),
        ({'temperature': 0.0}, r'temperature must be positive, got 0.0'),
        ({'loss_mode': 'sum'}, r"loss_mode must be one of \['replace', 'add'\], got 'sum'"),
        ({'pooling': 'max'}, r"Unknown pooling 'max'"),
        ({'log_interval': 0}, r'log_interval must be at least 1 batch, got 0'),
    ],
)
def test_constructor_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveTuning(**kwargs)


def test_indivisible_queue_size_raises_at_fit():
    algorithm = ContrastiveTuning(queue_size=6, **HEAD_DIMS)
    trainer, _, _ = encoder_trainer([algorithm], dict_loader(8, ('view0', 'view1')))
    queue_before = algorithm.head.queue.queue.clone()

    with pytest.raises(ValueError, match=r'queue size 6 is not a multiple of the global batch size 4'):
        trainer.fit()
    # FIT_START comes before the first batch, so nothing was enqueued.
    assert torch.equal(algorithm.head.queue.queue, queue_before)
    assert int(algorithm.head.queue.num_filled) == 0


def test_microbatch_smaller_than_batch_raises_at_fit():
    algorithm = ContrastiveTuning(queue_size=8, **HEAD_DIMS)
    trainer, _, _ = encoder_trainer([algorithm], dict_loader(8, ('view0', 'view1')), device_train_microbatch_size=2)
    with pytest.raises(ValueError, match=r'device_train_microbatch_size \(2\) splits the batch of 4'):
        trainer.fit()


@pytest.mark.parametrize(
    ('keys', 'listed'),
    [
        (('pixels', 'label'), "['label', 'pixels']"),
        (('view0', 'index'), "['index', 'view0']"),
    ],
    ids=['no-image-key', 'one-view-only'],
)
def test_batch_without_views_or_image_raises(keys, listed):
    algorithm = ContrastiveTuning(queue_size=8, **HEAD_DIMS)
    trainer, _, _ = encoder_trainer([algorithm], dict_loader(8, keys))
    with pytest.raises(ValueError, match=r"needs a batch with 'view0' and 'view1' or with 'image'") as error:
        trainer.fit()
    assert listed in str(error.value)


def test_images_that_are_not_4d_raise():
    flat = TensorDataset(torch.randn(8, 3 * 32 * 32), torch.zeros(8, dtype=torch.long))
    algorithm = ContrastiveTuning(queue_size=8, **HEAD_DIMS)
    trainer, _, _ = encoder_trainer([algorithm], DataLoader(flat, batch_size=BATCH_SIZE))
    with pytest.raises(ValueError, match=r'expects images \[B, C, H, W\], got shape \(4, 3072\)'):
        trainer.fit()


def test_model_without_vit_raises_at_trainer_init():
    model = ComposerClassifier(
        module=nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, NUM_CLASSES)), num_classes=NUM_CLASSES
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r'ComposerClassifier contains no timm VisionTransformer'):
        make_trainer(model, optimizer, [ContrastiveTuning(queue_size=8, **HEAD_DIMS)], classifier_loader())


def test_second_head_raises_at_init():
    algorithms = [ContrastiveTuning(queue_size=8, **HEAD_DIMS), ContrastiveTuning(queue_size=8, **HEAD_DIMS)]
    with pytest.raises(ValueError, match=r'ViTEncoderModel already has a `maect_head`'):
        encoder_trainer(algorithms, dict_loader(8, ('view0', 'view1')))


# ---------------------------------------------------------------------------------------------------------------------
# Frozen blocks and the EMA target projector


class TargetEMAChecker(Callback):
    """Check after each step that the target moved by ``θ_t ← m·θ_t + (1 − m)·θ`` and copied the online buffers.

    Callbacks run after the algorithms at each event, so at BATCH_END the optimizer has stepped and ContrastiveTuning
    has updated the target.
    """

    def __init__(self, algorithm: ContrastiveTuning, momentum: float):
        self.algorithm = algorithm
        self.momentum = momentum
        self.target_before: dict[str, torch.Tensor] = {}
        self.checked_steps = 0

    def batch_start(self, state, logger):
        head = self.algorithm.head.head
        self.target_before = {name: param.detach().clone() for name, param in head.target_projector.named_parameters()}

    def batch_end(self, state, logger):
        head = self.algorithm.head.head
        online = dict(head.projector.named_parameters())
        for name, param in head.target_projector.named_parameters():
            expected = self.momentum * self.target_before[name] + (1 - self.momentum) * online[name].detach()
            torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
            assert not torch.equal(param.detach(), self.target_before[name]), f'target {name} did not move'
        online_buffers = dict(head.projector.named_buffers())
        for name, buffer in head.target_projector.named_buffers():
            assert torch.equal(buffer, online_buffers[name]), name
        self.checked_steps += 1


@pytest.mark.parametrize('num_frozen_blocks', [2, 'all'])
def test_frozen_blocks_and_target_ema(num_frozen_blocks):
    momentum = 0.9
    algorithm = ContrastiveTuning(queue_size=8, target_momentum=momentum, **HEAD_DIMS)
    checker = TargetEMAChecker(algorithm, momentum)
    unfreezing = LayerwiseUnfreezing(num_frozen_blocks=num_frozen_blocks, layer_decay=0.75)
    trainer, model, optimizer = encoder_trainer(
        [algorithm, unfreezing],
        dict_loader(12, ('image', 'index', 'label')),
        max_duration='3ba',
        callbacks=[checker],
    )
    encoder_before = snapshot(model.encoder)
    head = algorithm.head.head
    online_before = snapshot(head.projector)

    # The target gets no gradient and is not in the optimizer.
    optimized = {id(param) for group in optimizer.param_groups for param in group['params']}
    for name, param in head.target_projector.named_parameters():
        assert not param.requires_grad, name
        assert id(param) not in optimized, name

    trainer.fit()
    trainer.close()
    assert checker.checked_steps == 3

    encoder_after = snapshot(model.encoder)
    frozen_prefixes = ('cls_token', 'pos_embed', 'patch_embed.', 'blocks.0.', 'blocks.1.')
    if num_frozen_blocks == 'all':
        frozen_prefixes = ('',)
    for name, value in encoder_before.items():
        if name.startswith(frozen_prefixes):
            assert torch.equal(encoder_after[name], value), f'frozen {name} changed'
        else:
            assert not torch.equal(encoder_after[name], value), f'trainable {name} did not change'
    for name, value in snapshot(head.projector).items():
        if name.endswith('num_batches_tracked'):
            continue
        assert not torch.equal(value, online_before[name]), f'head {name} did not change'


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint and autoresume in the middle of tuning


def resumable_run(save_folder: Path | None, **kwargs):
    # Single-view batches: the two views are cropped from the global torch RNG, whose state Composer checkpoints, and
    # topk 2 draws the neighbour from it too. 16 samples make 4 batches per epoch, so the resumed run crosses an epoch.
    algorithm = ContrastiveTuning(queue_size=8, topk=2, target_momentum=0.9, **HEAD_DIMS)
    losses = LossRecorder()
    if save_folder is not None:
        kwargs.update(save_folder=str(save_folder), save_interval='1ba', run_name='contrastive-resume')
    trainer, model, _ = encoder_trainer(
        [algorithm, LayerwiseUnfreezing(num_frozen_blocks=2)],
        dict_loader(16, ('image', 'index', 'label')),
        max_duration='6ba',
        callbacks=[losses],
        **kwargs,
    )
    return trainer, model, algorithm, losses


def test_resume_matches_uninterrupted_run(tmp_path):
    reference, reference_model, reference_algorithm, reference_losses = resumable_run(None)
    reference.fit()
    reference.close()
    assert len(reference_losses.losses) == 6

    first, _, _, first_losses = resumable_run(tmp_path)
    first.fit(duration='3ba')
    first.close()
    assert first_losses.losses == reference_losses.losses[:3]

    resumed, resumed_model, resumed_algorithm, resumed_losses = resumable_run(tmp_path, autoresume=True)
    assert resumed.state.timestamp.batch.value == 3
    resumed.fit()
    resumed.close()

    assert resumed_losses.losses == reference_losses.losses[3:]
    for name in ('queue', 'queue_ids', 'queue_labels', 'queue_ptr', 'num_filled'):
        assert torch.equal(
            getattr(resumed_algorithm.head.queue, name), getattr(reference_algorithm.head.queue, name)
        ), name
    reference_target = reference_algorithm.head.head.target_projector.state_dict()
    for name, value in resumed_algorithm.head.head.target_projector.state_dict().items():
        assert torch.equal(value, reference_target[name]), name
    reference_weights = reference_model.state_dict()
    for name, value in resumed_model.state_dict().items():
        assert torch.equal(value, reference_weights[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# One process against two under Composer's launcher


def run_script(out_dir: Path, num_processes: int) -> list[dict]:
    """Run the tuning script on ``num_processes`` gloo ranks on 127.0.0.1 and return each rank's results."""
    out_dir.mkdir()
    run_script_on_ranks(REPO / 'tests' / 'scripts' / 'contrastive_tuning_run.py', out_dir, num_processes)
    return [torch.load(out_dir / f'rank{rank}.pt') for rank in range(num_processes)]


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, relative: float, message: str) -> None:
    """Check that no entry differs by more than ``relative`` times the largest entry of ``expected``."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=relative * scale, msg=message)


@pytest.fixture(scope='module')
def script_results(tmp_path_factory) -> tuple[dict, list[dict]]:
    """The script's results on 1 rank and on 2 ranks, run once for the tests below."""
    out_dir = tmp_path_factory.mktemp('contrastive_tuning_run')
    (reference,) = run_script(out_dir / 'one', 1)
    return reference, run_script(out_dir / 'two', 2)


def test_two_processes_match_one_process(script_results):
    reference, ranks = script_results

    assert reference['wrapper'] == 'ViTEncoderModel'
    assert [result['wrapper'] for result in ranks] == ['DistributedDataParallel'] * 2
    assert reference['batchnorm_type'] == 'GlobalBatchNorm1d'

    # Both runs must see the same global batches, or nothing below could match.
    num_steps = len(reference['ids'])
    assert num_steps == 3
    for step in range(num_steps):
        two_rank_ids = torch.cat([result['ids'][step] for result in ranks])
        assert sorted(two_rank_ids.tolist()) == sorted(reference['ids'][step].tolist()), step
        assert len(ranks[0]['ids'][step]) == len(ranks[1]['ids'][step]) == 4

    # Each rank's loss averages its own rows, so the global loss is the mean over ranks.
    for step in range(num_steps):
        mean_loss = sum(result['losses'][step] for result in ranks) / len(ranks)
        assert mean_loss == pytest.approx(reference['losses'][step], rel=1e-5), step

    # The gradients after DDP averaged them. Float32 sums run in another order and the loss divides by the
    # temperature, so entries differ by up to about 1e-5 of the largest gradient.
    for step in range(num_steps):
        for name, expected in reference['gradients'][step].items():
            for rank, result in enumerate(ranks):
                actual = result['gradients'][step][name]
                assert_close_to_scale(actual, expected, 2e-5, f'step {step}, rank {rank}, {name}')

    # Rank r's rows follow those of ranks 0 .. r-1 in each global batch, so compare rows sorted by sample id.
    expected_queue = reference['queue']
    order = expected_queue['queue_ids'].argsort()
    for rank, result in enumerate(ranks):
        queue = result['queue']
        assert torch.equal(queue['queue_ids'], ranks[0]['queue']['queue_ids'])
        assert torch.equal(queue['queue'], ranks[0]['queue']['queue']), f'rank {rank} queue differs from rank 0'
        rank_order = queue['queue_ids'].argsort()
        assert torch.equal(queue['queue_ids'][rank_order], expected_queue['queue_ids'][order])
        assert torch.equal(queue['queue_labels'][rank_order], expected_queue['queue_labels'][order])
        # The rows are unit vectors, so an absolute tolerance is a relative one.
        torch.testing.assert_close(queue['queue'][rank_order], expected_queue['queue'][order], rtol=0, atol=1e-5)
        assert torch.equal(queue['queue_ptr'], expected_queue['queue_ptr'])
        assert torch.equal(queue['num_filled'], expected_queue['num_filled'])
    # The queue of 16 contains the last two global batches, so every id in it is unique.
    assert sorted(expected_queue['queue_ids'].tolist()) == list(range(8, 24))

    for name, expected in reference['target_projector'].items():
        for rank, result in enumerate(ranks):
            torch.testing.assert_close(
                result['target_projector'][name], expected, rtol=1e-5, atol=1e-5, msg=f'rank {rank}, {name}'
            )


def test_ddp_rejects_classifier_without_gradient(script_results):
    # The script also fits a ViT classifier whose trainable 10-class head gets no gradient from the NNCLR loss.
    reference, ranks = script_results

    # One process has no DDP, so the classifier trains.
    assert reference['classifier_error'] is None
    for result in ranks:
        message = result['classifier_error']
        assert message is not None
        assert 'gives no gradient to 2 trainable parameters of the model (module.head.weight, module.head.bias)' in (
            message
        )
        assert "loss_mode='add'" in message


# ---------------------------------------------------------------------------------------------------------------------
# The full-size model


@pytest.mark.slow
def test_vit_huge_tuning_step():
    """One contrastive-tuning step of ViT-H/14 at 224 px with the recipe's head, on two images."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = ViTEncoderModel(create_encoder('vit_huge_patch14'))
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.05)
    algorithm = ContrastiveTuning(
        proj_hidden_dim=2048,
        pred_hidden_dim=4096,
        out_dim=256,
        queue_size=4,
        topk=2,
        temperature=0.3,
        target_momentum=0.995,
        head_weight_decay=1e-5,
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1])), batch_size=2)
    losses = LossRecorder()
    trainer = make_trainer(
        model,
        optimizer,
        [algorithm, LayerwiseUnfreezing(num_frozen_blocks=16, layer_decay=0.65)],
        loader,
        max_duration='1ba',
        callbacks=[losses],
    )
    blocks = model.encoder.blocks
    assert len(blocks) == 32
    block0_before = blocks[0].mlp.fc1.weight.detach().clone()
    block31_before = blocks[31].mlp.fc1.weight.detach().clone()

    trainer.fit()
    trainer.close()

    assert len(losses.losses) == 1
    assert math.isfinite(losses.losses[0]['total'])
    assert torch.equal(blocks[0].mlp.fc1.weight.detach(), block0_before)
    assert not torch.equal(blocks[31].mlp.fc1.weight.detach(), block31_before)
    assert int(algorithm.head.queue.num_filled) == 2
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f'ViT-H/14 tuning step: {time.perf_counter() - start:.0f} s, peak resident memory {peak_gib:.1f} GiB')
