"""``EMA``: Composer's EMA algorithm with one fused update of the trainable parameters per step.

Composer 0.32.1's ``EMA`` averages every trainable parameter and every buffer with two temporaries and a copy per
tensor. Its buffers include the NNCLR queue (65,536 x 256 floats in MAE-CT), whose average means nothing, and the
queue's integer pointers and ids, which the float average truncates. In a cProfile of one ViT-B/16 tuning step at
batch 8 on a 2-core CPU, that update took about 6 % of the step.

This subclass keeps Composer's events, swaps and checkpoint state, and changes only what it averages and how:

* parameters that required gradients when averaging started, updated with ``torch._foreach_lerp_``;
* no buffers. The model keeps its own buffers when the EMA weights are swapped in, which is the same as copying the
  buffers into the average after every step.

The class keeps the name ``EMA``, because Composer stores and matches algorithm state by class name. Checkpoints of
runs with Composer's ``EMA`` therefore resume with this one and the other way round, and
``composer_maect.checkpoints`` finds the EMA weights of both.
"""

from __future__ import annotations

import torch
from composer.algorithms import EMA as ComposerEMA
from composer.algorithms.ema.ema import EMAParameters, get_model_context_manager
from composer.core import Event, State
from composer.loggers import Logger
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ['EMA', 'lerp_towards']


def lerp_towards(averages: list[torch.Tensor], values: list[torch.Tensor], smoothing: float) -> None:
    """Set ``averages[i] = smoothing * averages[i] + (1 - smoothing) * values[i]`` in place for every ``i``.

    One ``torch._foreach_lerp_`` call updates all tensors, without temporaries. Integer tensors cannot be averaged,
    so they are copied instead.

    Raises:
        ValueError: If the two lists differ in length or a pair differs in shape.
    """
    if len(averages) != len(values):
        raise ValueError(f'Got {len(averages)} averages but {len(values)} values; pass one value per average.')
    floating_averages, floating_values = [], []
    with torch.no_grad():
        for average, value in zip(averages, values, strict=True):
            if average.shape != value.shape:
                raise ValueError(f'Cannot average a tensor of shape {tuple(value.shape)} into {tuple(average.shape)}.')
            if average.is_floating_point():
                floating_averages.append(average)
                # No detach: under no_grad the lerp records nothing, and a detach per tensor costs a dispatch.
                floating_values.append(value)
            else:
                average.copy_(value)
        if floating_averages:
            torch._foreach_lerp_(floating_averages, floating_values, 1.0 - smoothing)


def _full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``tensors`` with every ``DTensor`` gathered into a full tensor (a collective call on every rank)."""
    return {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in tensors.items()}


def _shard_like_model(tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Replace each full tensor whose model parameter is a ``DTensor`` with this rank's shard, in place.

    Every rank has the same full tensor, so the shard is cut locally, without communication.
    """
    for name, param in model.named_parameters():
        average = tensors.get(name)
        if average is not None and isinstance(param, DTensor) and not isinstance(average, DTensor):
            tensors[name] = distribute_tensor(
                average.to(param.device), param.device_mesh, param.placements, src_data_rank=None
            )


def _drop_buffers(ema_parameters: EMAParameters | None) -> None:
    if ema_parameters is not None and ema_parameters.named_buffers_dict:
        ema_parameters.named_buffers_dict = {}


class EMA(ComposerEMA):
    """Composer's ``EMA`` that averages only the trainable parameters, with one foreach update per step.

    The arguments, events and checkpoint state are those of ``composer.algorithms.EMA``. The average covers the
    parameters that require gradients at its first update (after ``LayerwiseUnfreezing`` froze the lower blocks).
    Buffers are not averaged: the model keeps the training buffers also while the EMA weights are swapped in. State
    loaded from a checkpoint of Composer's ``EMA`` may contain averaged buffers. They stay until the next update,
    so the swap that follows the load puts the training buffers back first, and are then dropped.

    Under FSDP2 the averages are ``DTensor`` shards like the parameters. Composer 0.32.1 stores algorithm state as
    one object that a sharded checkpoint keeps from rank 0 only, so ``state_dict`` gathers the averages into full
    tensors, and a loaded state is cut into this rank's shards at the next event.

    NOTE: the foreach update under FSDP1 has not been run here; it uses the same full-parameter context as Composer's.
    """

    _reshard_after_load = False

    def state_dict(self) -> dict:
        state = super().state_dict()
        ema_state = state.get('ema_model')
        if isinstance(ema_state, dict):
            state['ema_model'] = {key: _full_tensors(tensors) for key, tensors in ema_state.items()}
        return state

    def load_state_dict(self, state: dict, strict: bool = False) -> None:
        super().load_state_dict(state, strict)
        self._reshard_after_load = True

    def match(self, event: Event, state: State) -> bool:
        started = self.ema_started
        matched = super().match(event, state)
        if self.ema_started and not started:
            # Composer's match() has just built the average from the model, with every buffer.
            _drop_buffers(self.ema_model)
        return matched

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if self._reshard_after_load and self.ema_model is not None:
            _shard_like_model(self.ema_model.named_parameters_dict, state.model)
            self._reshard_after_load = False
        if event in (Event.BATCH_END, Event.EPOCH_END):
            self._update(state.model)
            return
        super().apply(event, state, logger)
        if event == Event.INIT:
            _drop_buffers(self.ema_model)

    def _update(self, model: nn.Module) -> None:
        ema = self.ema_model
        assert ema is not None, 'The EMA parameters are created at Event.INIT.'
        _drop_buffers(ema)
        averages, values = [], []
        with get_model_context_manager(model):
            for name, param in model.named_parameters():
                average = ema.named_parameters_dict.get(name)
                if average is not None:
                    averages.append(average)
                    values.append(param)
            lerp_towards(averages, values, self.smoothing)
