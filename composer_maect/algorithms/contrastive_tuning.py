"""``ContrastiveTuning``: the NNCLR objective of MAE-CT on the timm ViT inside any ``ComposerModel``.

Per training step, for a local batch of ``B`` images:

1. two views ``[B, C, H, W]`` come from the batch (``view0``/``view1``) or are cropped and flipped on the device from
   a single-view batch;
2. the ViT encodes both views in one call (``forward_features``, which ends with the final LayerNorm) and the tokens
   are pooled (CLS or mean of patch tokens) into ``[2B, D]``;
3. the NNCLR head projects and predicts each view separately (batch norm over the global batch);
4. each view's normalised projection looks up a neighbour in the queue, the symmetric NNCLR loss is computed, and the
   all-gathered view-0 projections are enqueued.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from composer_maect.algorithms.layerwise_unfreezing import find_vision_transformer
from composer_maect.losses import nnclr_loss
from composer_maect.models.global_batchnorm import convert_to_global_batchnorm
from composer_maect.models.nnclr_head import NNCLRHead
from composer_maect.models.pooling import check_pooling, pool_tokens
from composer_maect.models.queue import NNQueue
from composer_maect.models.views import random_resized_crop_flip
from composer_maect.optim import param_groups_weight_decay

__all__ = ['ContrastiveHead', 'ContrastiveTuning', 'attach_contrastive_head']

log = logging.getLogger(__name__)

# Name of the head attribute on the ComposerModel; it is a direct child so that FSDP wraps it as its own unit.
HEAD_ATTRIBUTE = 'maect_head'
LOSS_MODES = ('replace', 'add')
# Modules of a timm VisionTransformer that only its classifier path (forward_head) uses, not forward_features.
_VIT_HEAD_MODULES = frozenset({'attn_pool', 'fc_norm', 'head_drop', 'head'})


class ContrastiveHead(nn.Module):
    """The NNCLR head and its neighbour queue, saved together with the model.

    ``forward(pooled [B, D]) -> (projected [B, out_dim], predicted [B, out_dim])`` runs one view through the head.
    """

    def __init__(self, head: NNCLRHead, queue: NNQueue) -> None:
        super().__init__()
        self.head = head
        self.queue = queue

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(pooled)


def attach_contrastive_head(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    proj_hidden_dim: int = 2048,
    pred_hidden_dim: int = 4096,
    out_dim: int = 256,
    queue_size: int = 65536,
    target_momentum: float | None = None,
    head_lr_scale: float = 1.0,
    head_weight_decay: float | None = None,
    queue_seed: int = 0,
) -> tuple[VisionTransformer, ContrastiveHead]:
    """Add an NNCLR head with its queue to ``model`` as ``model.maect_head`` and its parameters to ``optimizer``.

    The head's batch norms compute statistics over the global batch. Its parameters join the optimizer as new groups
    with lr ``optimizer.defaults['lr'] × head_lr_scale`` and weight decay ``head_weight_decay`` (default: the
    optimizer's), with no weight decay on biases and 1-D parameters.

    Returns:
        ``(vit, head)``: the model's only timm ``VisionTransformer`` and the attached head.

    Raises:
        ValueError: if ``model`` has no ViT, more than one, or already has a head.
    """
    vit = find_vision_transformer(model)
    if hasattr(model, HEAD_ATTRIBUTE):
        raise ValueError(f'{type(model).__name__} already has a `{HEAD_ATTRIBUTE}`: add ContrastiveTuning only once.')
    head = NNCLRHead(
        vit.embed_dim,
        proj_hidden_dim=proj_hidden_dim,
        pred_hidden_dim=pred_hidden_dim,
        out_dim=out_dim,
        target_momentum=target_momentum,
    )
    head = convert_to_global_batchnorm(head)
    module = ContrastiveHead(head, NNQueue(queue_size, out_dim, seed=queue_seed))
    reference = next(vit.parameters(), None)
    if reference is not None:
        module.to(reference.device)
    setattr(model, HEAD_ATTRIBUTE, module)

    if optimizer is not None:
        lr = optimizer.defaults['lr'] * head_lr_scale
        weight_decay = optimizer.defaults.get('weight_decay', 0.0) if head_weight_decay is None else head_weight_decay
        for group in param_groups_weight_decay(module.named_parameters(), weight_decay):
            optimizer.add_param_group({**group, 'lr': lr, 'name': f'head.{group["name"]}'})
        log.info('NNCLR head: lr %.3g, weight decay %g, queue %d x %d', lr, weight_decay, queue_size, out_dim)
    return vit, module


def _total_loss(loss: Any) -> torch.Tensor:
    """Reduce a model loss the way Composer does before backward."""
    if isinstance(loss, torch.Tensor):
        return loss.mean()
    if isinstance(loss, Mapping):
        if 'total' in loss:
            return loss['total']
        return sum(value.mean() for value in loss.values())
    return sum(value.mean() for value in loss)


class ContrastiveTuning(Algorithm):
    """Add MAE-CT's nearest-neighbour contrastive objective (NNCLR) to the timm ViT inside any ``ComposerModel``.

    Events:
        * ``INIT``: finds the model's only timm ``VisionTransformer``, attaches an NNCLR head and its queue as
          ``model.maect_head`` (a direct child, so Composer's FSDP wraps it and checkpoints save it), and adds the
          head's parameters to the optimizer. The head's random initial weights come from ``state.rank_zero_seed`` on
          every rank, so that FSDP, which does not broadcast weights, shards the same head on every rank.
        * ``FIT_START``: checks that the global batch divides the queue size and that the batch is not split into
          microbatches (batch norm statistics and in-batch negatives depend on the whole batch). Under DDP with
          ``loss_mode='replace'`` it checks that the NNCLR loss reaches every trainable parameter, which a trainable
          classifier fails. Under FSDP2 it registers ``forward_features`` of the ViT as a forward method.
        * ``AFTER_LOSS`` (every microbatch): encodes two views, computes the NNCLR loss, enqueues view 0 and sets
          ``state.loss`` to ``{'nnclr', 'total'}`` (``loss_mode='replace'``) or ``{'model', 'nnclr', 'total'}`` with
          ``total = model + loss_weight × nnclr`` (``'add'``).
        * ``BATCH_END``: updates the EMA target projector (when ``target_momentum`` is set) and logs
          ``maect/nn_accuracy`` (when the batch has labels) and ``maect/queue_fill``.

    The head and queue are buffers and parameters of the model, so they are saved in checkpoints, restored by
    autoresume and carried from head initialisation into tuning by a weights-only load. The algorithm's own state is
    its settings.

    Args:
        pooling: ``'cls'`` (CLS token) or ``'mean_patch'`` (mean of patch tokens), both after the final LayerNorm.
        proj_hidden_dim, pred_hidden_dim, out_dim: widths of the projector, predictor and output.
        queue_size: entries in the neighbour queue; a multiple of the global batch.
        topk: 1 takes the nearest neighbour; ``k > 1`` draws one of the ``k`` nearest uniformly at random.
        temperature: softmax temperature of the loss.
        target_momentum: EMA momentum of the target projector used for lookup and enqueueing (tuning: 0.99 or
            0.995), or None to use the online projector (head initialisation).
        loss_mode: ``'replace'`` the model's loss or ``'add'`` to it.
        loss_weight: weight of the NNCLR loss in ``'add'`` mode.
        head_lr_scale: head lr as a multiple of the optimizer's lr.
        head_weight_decay: weight decay of the head (default: the optimizer's).
        crop_scale, crop_ratio, hflip: the random resized crop and flip that make two views of a single-view batch.
        queue_seed: seed of the queue's random initial entries (identical on every rank).
        log_interval: batches between metric logs.
        head_init_from: a checkpoint to load the head and its queue from at ``INIT``: an official MAE-CT ``.th`` file
            or a checkpoint of this package (see ``composer_maect.checkpoints.load_head_weights``).

    Example:
        >>> from composer.models import ComposerClassifier
        >>> algorithm = ContrastiveTuning(queue_size=4096, temperature=0.15)
        >>> # Trainer(model=ComposerClassifier(vit, num_classes=10), algorithms=[algorithm], ...)
    """

    def __init__(
        self,
        *,
        pooling: str = 'cls',
        proj_hidden_dim: int = 2048,
        pred_hidden_dim: int = 4096,
        out_dim: int = 256,
        queue_size: int = 65536,
        topk: int = 1,
        temperature: float = 0.15,
        target_momentum: float | None = None,
        loss_mode: str = 'replace',
        loss_weight: float = 1.0,
        head_lr_scale: float = 1.0,
        head_weight_decay: float | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        queue_seed: int = 0,
        log_interval: int = 1,
        head_init_from: str | None = None,
    ) -> None:
        check_pooling(pooling)
        if topk < 1 or topk > queue_size:
            raise ValueError(f'topk must be between 1 and queue_size ({queue_size}), got {topk}.')
        if temperature <= 0:
            raise ValueError(f'temperature must be positive, got {temperature}.')
        if loss_mode not in LOSS_MODES:
            raise ValueError(f'loss_mode must be one of {list(LOSS_MODES)}, got {loss_mode!r}.')
        if log_interval < 1:
            raise ValueError(f'log_interval must be at least 1 batch, got {log_interval}.')
        self.pooling = pooling
        self.head_kwargs = {
            'proj_hidden_dim': proj_hidden_dim,
            'pred_hidden_dim': pred_hidden_dim,
            'out_dim': out_dim,
            'queue_size': queue_size,
            'target_momentum': target_momentum,
            'head_lr_scale': head_lr_scale,
            'head_weight_decay': head_weight_decay,
            'queue_seed': queue_seed,
        }
        self.queue_size = queue_size
        self.topk = topk
        self.temperature = temperature
        self.loss_mode = loss_mode
        self.loss_weight = loss_weight
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.hflip = hflip
        self.log_interval = log_interval
        self.head_init_from = head_init_from
        self._vit: VisionTransformer | None = None
        self._head: ContrastiveHead | None = None
        self._head_forward: nn.Module | None = None  # the FSDP1 wrapper of the head, when there is one
        self._nn_accuracy: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f'ContrastiveTuning(pooling={self.pooling!r}, queue_size={self.queue_size}, topk={self.topk}, '
            f'temperature={self.temperature}, target_momentum={self.head_kwargs["target_momentum"]}, '
            f'loss_mode={self.loss_mode!r})'
        )

    @property
    def head(self) -> ContrastiveHead:
        """The attached head and queue (available after ``Event.INIT``)."""
        if self._head is None:
            raise RuntimeError('ContrastiveTuning has not attached its head yet; that happens at Event.INIT.')
        return self._head

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            optimizer = state.optimizers[0] if state.optimizers else None
            # Composer seeds rank r with rank_zero_seed + r before INIT. Unlike DDP, FSDP does not broadcast weights,
            # so each rank would shard its own random head. The same seed on every rank gives one head.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(state.rank_zero_seed)
                self._vit, self._head = attach_contrastive_head(state.model, optimizer, **self.head_kwargs)
            if self.head_init_from is not None:
                # Before Composer loads any checkpoint, so that a resumed run keeps its own head and queue.
                from composer_maect.checkpoints import load_head_weights

                load_head_weights(self._head, self.head_init_from)
                log.info('Loaded the NNCLR head and queue from %s', self.head_init_from)
        elif event == Event.FIT_START:
            self._check_batch_sizes(state)
            self._check_ddp_gradients(state)
            self._register_fsdp_forward()
            self._route_fsdp1_calls(state)
        elif event == Event.AFTER_LOSS:
            self._add_loss(state)
        elif event == Event.BATCH_END:
            self._after_step(state, logger)

    def _check_batch_sizes(self, state: State) -> None:
        dataloader = state.train_dataloader
        batch_size = getattr(dataloader, 'batch_size', None)
        if batch_size is None:
            return
        microbatch = state.device_train_microbatch_size
        if microbatch is not None and microbatch < batch_size:
            raise ValueError(
                f'ContrastiveTuning needs whole batches, but device_train_microbatch_size ({microbatch}) splits the '
                f'batch of {batch_size}: batch norm statistics and in-batch negatives would change. Remove '
                'device_train_microbatch_size or make it equal to the per-rank batch size.'
            )
        self.head.queue.check_batch_size(batch_size * dist.get_world_size())

    def _check_ddp_gradients(self, state: State) -> None:
        """Raise if DDP would wait for gradients that the 'replace' loss never produces.

        DDP fails at the second step when a trainable parameter got no gradient in the first. In 'replace' mode only
        the ViT's ``forward_features`` and the head get gradients, so a trainable classifier, for example, would stop
        the run there with an unclear error.
        """
        if self.loss_mode != 'replace' or not isinstance(state.model, DistributedDataParallel):
            return
        reached = {
            id(param) for name, param in self._vit.named_parameters() if name.split('.', 1)[0] not in _VIT_HEAD_MODULES
        }
        reached.update(id(param) for param in self.head.parameters())
        unreached = [
            name
            for name, param in state.model.module.named_parameters()
            if param.requires_grad and id(param) not in reached
        ]
        if unreached:
            listed = ', '.join(unreached[:5]) + (', ...' if len(unreached) > 5 else '')
            raise ValueError(
                f"With loss_mode='replace' the NNCLR loss gives no gradient to {len(unreached)} trainable parameters "
                f'of the model ({listed}), and DDP fails at the next step when a parameter gets no gradient. Freeze '
                "them with requires_grad_(False) before creating the Trainer, or use loss_mode='add' to train them "
                "with the model's own loss."
            )

    def _register_fsdp_forward(self) -> None:
        try:
            from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
        except ImportError:  # older torch without FSDP2
            return
        if isinstance(self._vit, FSDPModule):
            register_fsdp_forward_method(self._vit, 'forward_features')

    def _route_fsdp1_calls(self, state: State) -> None:
        # Under FSDP1 the ViT and the head are calls into wrapped modules, which must go through their wrappers.
        from composer_maect.fsdp1_forward import find_fsdp1_wrapper, route_forward_features

        if route_forward_features(state.model, self._vit):
            log.info('ContrastiveTuning calls the ViT through its FSDP1 wrapper')
        self._head_forward = find_fsdp1_wrapper(state.model, self.head)

    def _views(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return ``(view0, view1, ids, labels)`` of a batch; ids and labels are None when the batch has none."""
        ids = labels = None
        if isinstance(batch, Mapping):
            ids = batch.get('index')
            labels = batch.get('label')
            if 'view0' in batch and 'view1' in batch:
                return batch['view0'], batch['view1'], ids, labels
            images = batch.get('image')
            if images is None:
                raise ValueError(
                    "ContrastiveTuning needs a batch with 'view0' and 'view1' or with 'image'; this batch has keys "
                    f'{sorted(map(str, batch))}.'
                )
        elif isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
            images = batch[0]
            if len(batch) > 1 and isinstance(batch[1], torch.Tensor) and batch[1].ndim == 1:
                labels = batch[1]
        elif isinstance(batch, torch.Tensor):
            images = batch
        else:
            raise ValueError(
                f'ContrastiveTuning cannot find images in a batch of type {type(batch).__name__}: use a dict with '
                "'view0'/'view1' or 'image', an (images, labels) tuple, or an image tensor."
            )
        if images.ndim != 4:
            raise ValueError(f'ContrastiveTuning expects images [B, C, H, W], got shape {tuple(images.shape)}.')
        view0 = random_resized_crop_flip(images, scale=self.crop_scale, ratio=self.crop_ratio, hflip=self.hflip)
        view1 = random_resized_crop_flip(images, scale=self.crop_scale, ratio=self.crop_ratio, hflip=self.hflip)
        return view0, view1, ids, labels

    def compute_loss(self, batch: Any, state: State | None = None) -> torch.Tensor:
        """Encode two views of ``batch``, compute the NNCLR loss and enqueue view 0; return the loss (fp32 scalar)."""
        view0, view1, ids, labels = self._views(batch)
        batch_size = view0.shape[0]
        head = self.head
        precision = (
            get_precision_context(state.precision, state.precision_config)
            if state is not None
            else contextlib.nullcontext()
        )
        with precision:
            tokens = self._vit.forward_features(torch.cat([view0, view1], dim=0))  # [2B, T, D]
            pooled = pool_tokens(tokens, self.pooling, self._vit.num_prefix_tokens)  # [2B, D]
            head_forward = self._head_forward if self._head_forward is not None else head
            projected0, predicted0 = head_forward(pooled[:batch_size])
            projected1, predicted1 = head_forward(pooled[batch_size:])

        z0 = F.normalize(projected0.detach().float(), dim=-1)
        z1 = F.normalize(projected1.detach().float(), dim=-1)
        nn0, index0 = head.queue.find_nn(z0, ids, self.topk)
        nn1, _ = head.queue.find_nn(z1, ids, self.topk)
        loss = nnclr_loss(predicted0, predicted1, nn0, nn1, self.temperature)
        if labels is not None:
            self._nn_accuracy = head.queue.nn_accuracy(index0, labels)
        head.queue.enqueue(z0, ids, labels)
        return loss

    def _add_loss(self, state: State) -> None:
        loss = self.compute_loss(state.batch, state)
        if self.loss_mode == 'replace':
            state.loss = {'nnclr': loss, 'total': loss}
            return
        base = _total_loss(state.loss)
        # 'nnclr' is logged unweighted, so its values compare across runs with different loss weights.
        state.loss = {'model': base, 'nnclr': loss, 'total': base + self.loss_weight * loss}

    def _after_step(self, state: State, logger: Logger) -> None:
        head = self.head.head
        if head.has_target:
            head.update_target()
        if int(state.timestamp.batch) % self.log_interval:
            return
        metrics = {'maect/queue_fill': self.head.queue.fill_fraction()}
        if self._nn_accuracy is not None:
            metrics['maect/nn_accuracy'] = float(self._nn_accuracy)
        logger.log_metrics(metrics)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state['settings'] = {
            'pooling': self.pooling,
            'topk': self.topk,
            'temperature': self.temperature,
            'loss_mode': self.loss_mode,
            **{key: value for key, value in self.head_kwargs.items() if key != 'queue_seed'},
        }
        return state
