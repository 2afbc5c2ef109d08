"""NNCLR projection head of MAE-CT: projector, predictor and an optional EMA target projector.

The layer sizes, the missing biases and the final BatchNorm follow the official MAE-CT code, and the ``nn.Sequential``
indices match its state-dict keys (``projector.0.weight`` ... ``projector.7.bias``, ``predictor.0.weight`` ...
``predictor.3.weight``). All layers keep PyTorch's default initialisation. The outputs are not normalised, because the
queue lookup and the loss normalise them.

BatchNorm statistics depend on the batch, so the caller passes each view through the head separately. Under DDP the
official code converts every BatchNorm to ``SyncBatchNorm`` so that the statistics cover the global batch, and
:meth:`NNCLRHead.convert_sync_batchnorm` does the same here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ['NNCLRHead', 'build_predictor', 'build_projector']


def build_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Build ``Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN``, with no bias in the linear layers."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim),
    )


def build_predictor(dim: int, hidden_dim: int) -> nn.Sequential:
    """Build ``Linear-BN-ReLU-Linear``, with no bias in the linear layers."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, dim, bias=False),
    )


class NNCLRHead(nn.Module):
    """Projector and predictor on pooled encoder features, with an optional EMA copy of the projector.

    Without ``target_momentum`` (head initialisation on a frozen encoder) the projection that the caller looks up
    and enqueues is the online projector's output. With it (contrastive tuning) the projection comes from
    ``target_projector``, an exponential moving average of the projector that gets no gradient. Call
    :meth:`update_target` after every optimizer step.

    Loading a state dict that has projector keys but no ``target_projector.*`` keys into a head with a target copies
    the projector into the target, which is the transition from head initialisation to tuning. Saved target keys are
    loaded as they are, so resuming a tuning run restores the EMA target. (The official MAE-CT code overwrites the
    target on every load, which resets it when a run resumes.)

    Args:
        in_dim: Channels of the pooled encoder features (the ViT's embed dim).
        proj_hidden_dim: Hidden width of the projector.
        pred_hidden_dim: Hidden width of the predictor.
        out_dim: Output channels of the projector and the predictor.
        target_momentum: EMA momentum ``m`` of the target projector in ``[0, 1]``, or ``None`` for no target. MAE-CT
            tunes with 0.99 or 0.995.

    Raises:
        ValueError: If a dimension is not positive or ``target_momentum`` is outside ``[0, 1]``.
    """

    def __init__(
        self,
        in_dim: int,
        proj_hidden_dim: int = 2048,
        pred_hidden_dim: int = 4096,
        out_dim: int = 256,
        target_momentum: float | None = None,
    ):
        super().__init__()
        dims = (
            ('in_dim', in_dim),
            ('proj_hidden_dim', proj_hidden_dim),
            ('pred_hidden_dim', pred_hidden_dim),
            ('out_dim', out_dim),
        )
        for name, value in dims:
            if value < 1:
                raise ValueError(f'{name} must be a positive number of channels, got {value}.')
        if target_momentum is not None and not 0.0 <= target_momentum <= 1.0:
            raise ValueError(f'target_momentum must be in [0, 1] (or None for no target), got {target_momentum}.')

        self.in_dim = in_dim
        self.out_dim = out_dim
        self.target_momentum = target_momentum
        self.projector = build_projector(in_dim, proj_hidden_dim, out_dim)
        self.predictor = build_predictor(out_dim, pred_hidden_dim)
        self.target_projector: nn.Sequential | None = None
        if target_momentum is not None:
            # deepcopy gives the target its own storage, so the EMA update never writes into the online projector.
            self.target_projector = copy.deepcopy(self.projector)
            self.target_projector.requires_grad_(False)
        self.register_load_state_dict_pre_hook(_fill_missing_target_keys)

    @property
    def has_target(self) -> bool:
        """Whether the head has an EMA target projector."""
        return self.target_projector is not None

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project and predict one view.

        Args:
            pooled: Pooled encoder features of one view ``[batch, in_dim]``.

        Returns:
            ``(projected, predicted)``, both ``[batch, out_dim]`` and unnormalised. ``projected`` is the target
            projector's output when the head has a target, computed without gradient, and otherwise the online
            projector's output. ``predicted`` is ``predictor(projector(pooled))`` and is the only output that the loss
            differentiates.
        """
        if pooled.dim() != 2 or pooled.shape[1] != self.in_dim:
            raise ValueError(f'pooled must have shape [batch, {self.in_dim}], got {tuple(pooled.shape)}.')
        online = self.projector(pooled)
        predicted = self.predictor(online)
        if self.target_projector is None:
            return online, predicted
        # The target still runs in the head's mode, so in training its BatchNorms use batch statistics.
        with torch.no_grad():
            projected = self.target_projector(pooled.detach())
        return projected, predicted

    @torch.no_grad()
    def update_target(self) -> None:
        """Update the target projector: ``θ_t ← m·θ_t + (1 − m)·θ`` for parameters, a plain copy for buffers.

        Buffers are the BatchNorm running statistics and batch counters, which the official code copies rather than
        averages.

        Raises:
            RuntimeError: If the head has no target projector.
        """
        target = self._require_target()
        momentum = self.target_momentum
        targets = list(target.parameters())
        params = [param.detach() for param in self.projector.parameters()]
        if len(targets) != len(params):
            raise RuntimeError(f'The target projector has {len(targets)} parameters but the projector {len(params)}.')
        # One foreach call per operation replaces two kernels per parameter, with the same arithmetic.
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, params, alpha=1.0 - momentum)
        for target_buffer, buffer in zip(target.buffers(), self.projector.buffers(), strict=True):
            target_buffer.copy_(buffer)

    @torch.no_grad()
    def init_target_from_online(self) -> None:
        """Copy the projector's parameters and buffers into the target projector.

        Raises:
            RuntimeError: If the head has no target projector.
        """
        target = self._require_target()
        for target_tensor, tensor in zip(
            [*target.parameters(), *target.buffers()],
            [*self.projector.parameters(), *self.projector.buffers()],
            strict=True,
        ):
            target_tensor.copy_(tensor)

    def convert_sync_batchnorm(self, process_group: torch.distributed.ProcessGroup | None = None) -> NNCLRHead:
        """Replace every BatchNorm in the head with ``SyncBatchNorm`` in place and return the head.

        Call this when the world size is larger than 1 to compute BatchNorm statistics over the global batch, as the
        official code does. The parameters are kept by reference, so an optimizer built before the conversion still
        updates them. In training with an initialised process group (even of one rank), PyTorch 2.7's
        ``SyncBatchNorm`` raises ``ValueError`` for inputs that are not on CUDA, XPU or a PrivateUse1 device, so
        convert only for accelerator runs.
        """
        for name in ('projector', 'predictor', 'target_projector'):
            module = getattr(self, name)
            if module is not None:
                setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group))
        return self

    def _require_target(self) -> nn.Sequential:
        if self.target_projector is None:
            raise RuntimeError('This NNCLRHead has no target projector. Construct it with a target_momentum.')
        return self.target_projector


def _fill_missing_target_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, *args):
    """Copy ``projector.*`` entries to ``target_projector.*`` when a head with a target loads a dict without them."""
    if module.target_projector is None:
        return
    target_prefix = prefix + 'target_projector.'
    if any(key.startswith(target_prefix) for key in state_dict):
        return
    projector_prefix = prefix + 'projector.'
    for key in [key for key in state_dict if key.startswith(projector_prefix)]:
        # Clone so that loading with assign=True cannot make the target share storage with the projector.
        state_dict[target_prefix + key[len(projector_prefix) :]] = state_dict[key].clone()
