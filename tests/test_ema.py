"""The package's EMA: foreach update of the trainable parameters, with Composer's events and checkpoint state."""

import pytest
import torch
from composer.algorithms import EMA as ComposerEMA

from composer_maect import registry
from composer_maect.algorithms import EMA, ContrastiveTuning, LayerwiseUnfreezing
from composer_maect.algorithms.ema import lerp_towards

from .test_contrastive_tuning import HEAD_DIMS, dict_loader, encoder_trainer

SMOOTHING = 0.5


def test_lerp_towards_matches_composer_formula():
    generator = torch.Generator().manual_seed(0)
    averages = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    values = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    expected = [average * 0.9 + value * (1 - 0.9) for average, value in zip(averages, values, strict=True)]
    lerp_towards(averages, values, 0.9)
    for average, want in zip(averages, expected, strict=True):
        torch.testing.assert_close(average, want)


def test_lerp_towards_copies_integers():
    average = torch.tensor([5, 7])
    lerp_towards([average], [torch.tensor([3, 9])], 0.9999)
    assert average.tolist() == [3, 9]


def test_lerp_towards_rejects_mismatch():
    with pytest.raises(ValueError, match='2 averages but 1 values'):
        lerp_towards([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], 0.9)
    with pytest.raises(ValueError, match=r'shape \(3,\) into \(2,\)'):
        lerp_towards([torch.zeros(2)], [torch.zeros(3)], 0.9)


def test_registry_builds_package_ema():
    built = registry.build('algorithms', {'ema': {'half_life': None, 'smoothing': 0.9, 'update_interval': '1ba'}})
    assert type(built[0]) is EMA
    # Composer stores and matches algorithm state by class name, so checkpoints move between the two classes.
    assert EMA.__qualname__ == ComposerEMA.__qualname__


def tuning_run(ema: ComposerEMA, max_duration: str = '3ba', **kwargs):
    algorithms = [
        ContrastiveTuning(queue_size=16, topk=2, target_momentum=0.9, **HEAD_DIMS),
        LayerwiseUnfreezing(num_frozen_blocks=2),
        ema,
    ]
    loader = dict_loader(16, ('view0', 'view1', 'index', 'label'))
    trainer, model, _ = encoder_trainer(algorithms, loader, max_duration=max_duration, **kwargs)
    return trainer, model


def test_ema_averages_like_composer():
    """Same run with Composer's EMA and this one: equal averages of the trainable parameters, and no buffers."""
    averages = {}
    for ema_class in (ComposerEMA, EMA):
        ema = ema_class(half_life=None, smoothing=SMOOTHING, update_interval='1ba')
        trainer, model = tuning_run(ema)
        trainer.fit()
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        averages[ema_class] = (ema.ema_model.named_parameters_dict, ema.ema_model.named_buffers_dict, trainable)
        trainer.close()

    composer_params, composer_buffers, trainable = averages[ComposerEMA]
    params, buffers, _ = averages[EMA]
    assert set(params) == trainable
    assert any(name.startswith('maect_head.head.projector.') for name in params)
    assert not any(name.startswith('encoder.blocks.0.') for name in params)
    assert buffers == {}
    assert 'maect_head.queue.queue' in composer_buffers
    assert set(params) == set(composer_params)
    for name, average in params.items():
        torch.testing.assert_close(average, composer_params[name], msg=name)


def test_resume_from_composer_ema_checkpoint(tmp_path):
    """A checkpoint saved with Composer's EMA swapped in resumes with the training queue, not its average."""
    ema = ComposerEMA(half_life=None, smoothing=SMOOTHING, update_interval='1ba')
    trainer, _ = tuning_run(ema, max_duration='2ba', save_folder=str(tmp_path), save_interval='2ba')
    trainer.fit()
    assert ema.ema_weights_active
    assert 'maect_head.queue.queue_ptr' in ema.ema_model.named_buffers_dict
    trainer.close()

    ema = EMA(half_life=None, smoothing=SMOOTHING, update_interval='1ba')
    trainer, model = tuning_run(ema, max_duration='3ba', load_path=str(tmp_path / 'latest-rank0.pt'))
    trainer.fit()
    queue = model.maect_head.queue
    # Three batches of 4 images: 12 rows written. An averaged pointer would not be a multiple of the batch.
    assert queue.queue_ptr.item() == 12
    assert queue.num_filled.item() == 12
    assert ema.ema_model.named_buffers_dict == {}
    trainer.close()
