"""Freeze the lower blocks of a timm ViT encoder and give the rest layer-wise decayed learning rates.

This is the partial unfreezing of MAE-CT's contrastive-tuning stage. The stem and the lower blocks are frozen and
kept in ``eval()`` mode. Every trainable encoder parameter gets a learning rate of ``lr × layer_decay^(depth − i)``
for block ``i``, ``lr × layer_decay^(depth + 1)`` for the stem and ``lr`` for the final norm, the convention of BEiT
and MAE fine-tuning. Freezing the whole encoder (``'all'``) is MAE-CT's head-initialisation stage.

The functional core (:func:`find_vision_transformer`, :func:`freeze_lower_layers`, :func:`layer_decay_param_groups`)
works without a Trainer. :class:`LayerwiseUnfreezing` applies it to a Composer run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import ensure_tuple
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from composer_maect.optim import is_excluded_from_weight_decay

__all__ = ['LayerwiseUnfreezing', 'find_vision_transformer', 'freeze_lower_layers', 'layer_decay_param_groups']

log = logging.getLogger(__name__)

# Top-level attributes of a timm VisionTransformer that come before the blocks.
_STEM_NAMES = frozenset({'cls_token', 'reg_token', 'pos_embed', 'patch_embed', 'norm_pre'})
# The classifier of a timm ViT. It is not part of the encoder, so it is never frozen or given a layer-wise
# learning rate, and it stays in the optimizer group that the user put it in.
_CLASSIFIER_NAMES = frozenset({'head', 'head_drop'})
# Group keys that LayerwiseUnfreezing sets itself instead of copying them from the encoder's original group.
_OWN_GROUP_KEYS = frozenset({'params', 'param_names', 'lr', 'initial_lr', 'weight_decay', 'name'})


def find_vision_transformer(model: nn.Module) -> VisionTransformer:
    """Return the one timm ``VisionTransformer`` among the modules of ``model`` (``model`` itself included).

    Raises:
        ValueError: If ``model`` contains no ViT or more than one. The message names the model class and the
            attribute paths of the ViTs that were found.
    """
    found = [(path, module) for path, module in model.named_modules() if isinstance(module, VisionTransformer)]
    if len(found) == 1:
        return found[0][1]

    model_class = type(model).__name__
    if not found:
        children = ', '.join(f'{name} ({type(child).__name__})' for name, child in model.named_children())
        raise ValueError(
            f'{model_class} contains no timm VisionTransformer (its direct children: {children or "none"}). '
            'Layer-wise freezing needs the encoder to be a timm.models.vision_transformer.VisionTransformer.'
        )
    paths = ', '.join(repr(path or '<the model itself>') for path, _ in found)
    raise ValueError(
        f'{model_class} contains {len(found)} timm VisionTransformer modules ({paths}), but layer-wise freezing '
        'needs exactly one. Keep other ViTs (e.g. an EMA copy) outside the model, or call freeze_lower_layers and '
        'layer_decay_param_groups on the ViT you mean.'
    )


def _check_vit(vit: nn.Module) -> int:
    """Return the number of blocks of ``vit``."""
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f'Expected a timm VisionTransformer, got {type(vit).__name__}.')
    return len(vit.blocks)


def _check_num_frozen_blocks(num_frozen_blocks: int | str, depth: int | None) -> None:
    """Raise ValueError unless ``num_frozen_blocks`` is ``'all'`` or an int in ``[0, depth]``."""
    if num_frozen_blocks == 'all':
        return
    if isinstance(num_frozen_blocks, bool) or not isinstance(num_frozen_blocks, int):
        raise ValueError(
            f"Invalid num_frozen_blocks {num_frozen_blocks!r}: expected an int, 'all' or None (half the blocks)."
        )
    if num_frozen_blocks < 0 or (depth is not None and num_frozen_blocks > depth):
        limit = f'the encoder depth {depth}' if depth is not None else 'the encoder depth'
        raise ValueError(f'Invalid num_frozen_blocks {num_frozen_blocks}: it must be between 0 and {limit}.')


def _check_layer_decay(layer_decay: float) -> None:
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, int | float) or not 0.0 < layer_decay <= 1.0:
        raise ValueError(f'Invalid layer_decay {layer_decay!r}: it must be in (0, 1]. A value of 1 disables the decay.')


def _check_non_negative(value: float | None, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f'Invalid {what} {value!r}: expected a finite number >= 0.')


def _encoder_named_parameters(vit: VisionTransformer) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield the ViT's parameters except those of its classifier ``head``."""
    for name, param in vit.named_parameters():
        if name.split('.', 1)[0] not in _CLASSIFIER_NAMES:
            yield name, param


def freeze_lower_layers(vit: VisionTransformer, num_frozen_blocks: int | str) -> list[nn.Module]:
    """Set ``requires_grad=False`` on the stem and the first ``num_frozen_blocks`` blocks of a timm ViT.

    The stem is ``patch_embed``, ``cls_token``, ``pos_embed``, ``reg_token`` and ``norm_pre``. As in the official
    MAE-CT code, it is frozen whenever at least one block is, so no gradient has to flow back through frozen blocks,
    and ``0`` freezes nothing. ``'all'`` freezes the whole encoder: also the final ``norm``, ``fc_norm``,
    ``attn_pool`` and the dropout modules between them. The classifier ``head`` stays trainable in every case.

    Args:
        vit: The encoder, a timm ``VisionTransformer``.
        num_frozen_blocks: How many blocks to freeze from the bottom, from 0 to ``len(vit.blocks)``, or ``'all'``.

    Returns:
        The frozen submodules. Put them in ``eval()`` before each forward pass, because the Trainer puts the whole
        model in ``train()`` mode at each epoch start. Frozen tokens (``cls_token``, ...) are parameters, not
        modules, so they are not in the list.

    Raises:
        TypeError: If ``vit`` is not a timm ``VisionTransformer``.
        ValueError: If ``num_frozen_blocks`` is neither ``'all'`` nor an int between 0 and the depth.
    """
    depth = _check_vit(vit)
    _check_num_frozen_blocks(num_frozen_blocks, depth)

    if num_frozen_blocks == 0:
        return []
    if num_frozen_blocks == 'all':
        modules = [module for name, module in vit.named_children() if name not in _CLASSIFIER_NAMES]
    else:
        modules = [vit.patch_embed, vit.norm_pre, *vit.blocks[:num_frozen_blocks]]

    for module in modules:
        module.requires_grad_(False)
    for token in (vit.cls_token, vit.reg_token, vit.pos_embed):
        # Each token is None when the ViT is built without it.
        if token is not None:
            token.requires_grad_(False)
    return modules


def _layer_index(name: str, depth: int) -> int:
    """Map an encoder parameter name to its layer: 0 for the stem, ``i + 1`` for block ``i``, ``depth + 1`` after."""
    parts = name.split('.')
    if parts[0] in _STEM_NAMES:
        return 0
    if parts[0] == 'blocks':
        return int(parts[1]) + 1
    return depth + 1


def _layer_group_name(prefix: str, layer: int, depth: int) -> str:
    if layer == 0:
        return f'{prefix}.stem'
    if layer <= depth:
        return f'{prefix}.block{layer - 1}'
    return f'{prefix}.final'


def layer_decay_param_groups(
    vit: VisionTransformer,
    *,
    lr: float,
    layer_decay: float,
    weight_decay: float,
    prefix: str = 'encoder',
) -> list[dict[str, Any]]:
    """Build optimizer parameter groups with layer-wise learning-rate decay for the trainable encoder parameters.

    With ``depth = len(vit.blocks)``, block ``i`` gets ``lr × layer_decay^(depth − i)``, the stem (``patch_embed``,
    ``cls_token``, ``pos_embed``, ``reg_token``, ``norm_pre``) gets ``lr × layer_decay^(depth + 1)``, and everything
    after the blocks (``norm``, ``fc_norm``, ``attn_pool``) gets ``lr``. The last block is therefore already scaled
    by ``layer_decay``. Each layer has up to two groups: one with ``weight_decay`` and one with weight decay 0 for
    biases and 1-D parameters. Frozen parameters and the classifier ``head`` are left out, and empty groups are
    omitted.

    Args:
        vit: The encoder, a timm ``VisionTransformer``.
        lr: The learning rate of the final norm, before any schedule.
        layer_decay: The factor per layer, in ``(0, 1]``.
        weight_decay: The weight decay of the decayed groups.
        prefix: The start of each group's ``'name'``.

    Returns:
        Groups in order from the stem to the final norm, each with ``'params'``, ``'lr'``, ``'weight_decay'`` and
        a ``'name'`` for logs such as ``'encoder.block11.decay'``, ``'encoder.stem.no_decay'`` or
        ``'encoder.final.no_decay'``. They can be passed to any ``torch.optim`` optimizer.

    Raises:
        TypeError: If ``vit`` is not a timm ``VisionTransformer``.
        ValueError: If ``layer_decay`` is not in ``(0, 1]`` or ``lr`` or ``weight_decay`` is negative.

    Example:
        >>> vit = timm.create_model('vit_huge_patch14_224')  # 32 blocks
        >>> groups = layer_decay_param_groups(vit, lr=4e-4, layer_decay=0.65, weight_decay=0.05)
        >>> lrs = {group['name']: group['lr'] for group in groups}
        >>> names = ('encoder.block31.decay', 'encoder.block16.decay', 'encoder.final.no_decay')
        >>> [f'{lrs[name]:.3g}' for name in names]
        ['0.00026', '4.06e-07', '0.0004']
    """
    depth = _check_vit(vit)
    _check_layer_decay(layer_decay)
    _check_non_negative(lr, 'lr')
    _check_non_negative(weight_decay, 'weight_decay')

    # (layer, excluded from weight decay) -> parameters, in the order of vit.named_parameters().
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in _encoder_named_parameters(vit):
        if not param.requires_grad:
            continue
        key = (_layer_index(name, depth), is_excluded_from_weight_decay(name, param))
        buckets.setdefault(key, []).append(param)

    groups = []
    for layer, excluded in sorted(buckets):
        scale = layer_decay ** (depth + 1 - layer)
        groups.append(
            {
                'params': buckets[layer, excluded],
                'lr': lr * scale,
                'weight_decay': 0.0 if excluded else weight_decay,
                'name': f'{_layer_group_name(prefix, layer, depth)}.{"no_decay" if excluded else "decay"}',
            }
        )
    return groups


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _group_lr(group: dict[str, Any]) -> float:
    """Return the group's peak lr, ``'initial_lr'`` if set, because a torch scheduler has already scaled ``'lr'``."""
    return float(group.get('initial_lr', group['lr']))


class LayerwiseUnfreezing(Algorithm):
    """Freeze the lower blocks of the model's timm ViT and train the rest with layer-wise decayed learning rates.

    This is the encoder setup of MAE-CT's contrastive tuning. The stem and the lower half of the blocks are frozen
    and kept in ``eval()`` mode. The upper blocks train with a learning rate that shrinks by ``layer_decay`` per
    block from the top (see :func:`layer_decay_param_groups`). ``num_frozen_blocks='all'`` freezes the whole
    encoder, as in MAE-CT's head initialisation. The ViT is found anywhere in the model, e.g.
    ``ComposerClassifier(module=vit)`` or ``MAEModel``'s ``encoder.vit``. Its classifier ``head``, if it has one,
    is not part of the encoder and keeps its original optimizer group.

    Runs on these events:

    * :attr:`.Event.INIT`: finds the ViT, freezes it as configured, removes all encoder parameters from the
      optimizer's existing groups (groups left empty are dropped, other groups are kept unchanged) and appends the
      layer-decay groups. It logs each group's lr and the metrics ``layerwise_unfreezing/frozen_params`` and
      ``layerwise_unfreezing/trainable_params`` (numbers of encoder parameter elements). INIT comes before DDP
      and FSDP wrapping, so DDP ignores the frozen parameters and FSDP keeps the new groups with their lr and
      weight decay. The Trainer compiles Composer schedulers after INIT, so their multiplier applies to each group.
      NOTE: DDP and FSDP2 were run on CPU. FSDP1 needs CUDA and was only checked by reading Composer 0.32.1: it
      keeps every group key with ``use_orig_params=True`` (the default) and rejects several groups otherwise.
    * :attr:`.Event.FIT_START`: raises if a scheduler's base learning rates do not match the optimizer's groups,
      which happens when a ``torch.optim.lr_scheduler`` object was built on the optimizer before the Trainer.
    * :attr:`.Event.BATCH_START` and :attr:`.Event.BEFORE_FORWARD`: puts the frozen modules in ``eval()``, because
      the Trainer calls ``model.train()`` at each epoch start and after each evaluation.

    The setup depends only on the constructor arguments and the model, so a resumed run rebuilds the same groups
    at INIT, before the optimizer state is loaded. Checkpoints keep only the resolved settings
    (``num_frozen_blocks``, ``layer_decay``, ``lr``, ``weight_decay`` and the encoder ``depth``), and loading a
    checkpoint made with other settings raises an error.

    Example:
        .. code-block:: python

            import torch
            from composer import Trainer
            from composer.optim import CosineAnnealingWithWarmupScheduler

            from composer_maect.algorithms import LayerwiseUnfreezing

            trainer = Trainer(
                model=model,  # a ComposerModel with one timm ViT, e.g. 32 blocks for ViT-H/14
                optimizers=torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.05),
                schedulers=CosineAnnealingWithWarmupScheduler(t_warmup='0.2dur'),
                algorithms=[LayerwiseUnfreezing(layer_decay=0.65)],  # freezes blocks 0-15
                train_dataloader=train_dataloader,
                max_duration='30ep',
            )

    Args:
        num_frozen_blocks: How many blocks to freeze from the bottom, together with the stem (0 freezes nothing).
            ``None`` freezes ``depth // 2`` blocks, ``'all'`` the whole encoder. Default: ``None``.
        layer_decay: The learning-rate factor per layer, in ``(0, 1]``. Default: ``0.65``.
        lr: The learning rate of the final norm before the schedule. ``None`` takes the lr of the optimizer groups
            that contained the encoder's parameters. Default: ``None``.
        weight_decay: The weight decay of weights that are not biases or 1-D. ``None`` takes the weight decay of
            the optimizer groups that contained those weights. Default: ``None``.

    Raises:
        ValueError: At construction for an invalid argument. At INIT if the Trainer does not have exactly one
            optimizer, the model does not contain exactly one timm ViT, ``num_frozen_blocks`` exceeds its depth,
            ``lr`` or ``weight_decay`` is ``None`` and the optimizer's encoder groups do not give one value, those
            groups disagree on another setting such as ``betas``, or no parameter is left to train.
    """

    def __init__(
        self,
        num_frozen_blocks: int | str | None = None,
        layer_decay: float = 0.65,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        if num_frozen_blocks is not None:
            _check_num_frozen_blocks(num_frozen_blocks, depth=None)
        _check_layer_decay(layer_decay)
        _check_non_negative(lr, 'lr')
        _check_non_negative(weight_decay, 'weight_decay')
        self.num_frozen_blocks = num_frozen_blocks
        self.layer_decay = float(layer_decay)
        self.lr = lr
        self.weight_decay = weight_decay

        self._frozen_modules: list[nn.Module] = []
        # The settings resolved against the model and optimizer at INIT, and checkpoint settings that arrived first.
        self._settings: dict[str, Any] | None = None
        self._pending_checkpoint_settings: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(num_frozen_blocks={self.num_frozen_blocks!r}, layer_decay={self.layer_decay!r}, '
            f'lr={self.lr!r}, weight_decay={self.weight_decay!r})'
        )

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BATCH_START, Event.BEFORE_FORWARD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._set_up(state, logger)
        elif event == Event.FIT_START:
            self._check_schedulers(state)
        else:
            for module in self._frozen_modules:
                module.eval()

    def _set_up(self, state: State, logger: Logger) -> None:
        optimizers = ensure_tuple(state.optimizers)
        if len(optimizers) != 1:
            raise ValueError(f'LayerwiseUnfreezing needs exactly one optimizer, but the Trainer has {len(optimizers)}.')
        optimizer = optimizers[0]

        vit = find_vision_transformer(state.model)
        depth = len(vit.blocks)
        num_frozen_blocks = depth // 2 if self.num_frozen_blocks is None else self.num_frozen_blocks
        _check_num_frozen_blocks(num_frozen_blocks, depth)

        encoder_params = dict(_encoder_named_parameters(vit))
        encoder_ids = {id(param) for param in encoder_params.values()}
        lr, weight_decay, inherited = self._resolve_group_settings(optimizer, encoder_params)

        self._frozen_modules = freeze_lower_layers(vit, num_frozen_blocks)
        new_groups = layer_decay_param_groups(vit, lr=lr, layer_decay=self.layer_decay, weight_decay=weight_decay)
        _remove_params_from_optimizer(optimizer, encoder_ids)

        uses_param_names = any('param_names' in group for group in optimizer.param_groups)
        model_names = {id(param): name for name, param in state.model.named_parameters()}
        for group in new_groups:
            group.update({key: value for key, value in inherited.items() if key not in group})
            # torch's LambdaLR, which Composer compiles its schedulers into, reads base lrs from 'initial_lr' and
            # sets it only where it is missing. Setting it here lets the FIT_START check compare against it.
            group['initial_lr'] = group['lr']
            if uses_param_names:
                group['param_names'] = [model_names[id(param)] for param in group['params']]
            optimizer.add_param_group(group)

        if not any(group['params'] for group in optimizer.param_groups):
            raise ValueError(
                f'With num_frozen_blocks={num_frozen_blocks!r} the optimizer has no parameters left to train. '
                'Put a trainable module outside the encoder, such as a head, in the optimizer, or freeze fewer blocks.'
            )

        self._settings = {
            'num_frozen_blocks': num_frozen_blocks,
            'layer_decay': self.layer_decay,
            'lr': lr,
            'weight_decay': weight_decay,
            'depth': depth,
        }
        if self._pending_checkpoint_settings is not None:
            self._check_checkpoint_settings(self._pending_checkpoint_settings)
            self._pending_checkpoint_settings = None
        self._log_setup(optimizer, encoder_params, logger)

    def _resolve_group_settings(
        self, optimizer: torch.optim.Optimizer, encoder_params: dict[str, nn.Parameter]
    ) -> tuple[float, float, dict[str, Any]]:
        """Return the lr, weight decay and other hyperparameters (betas, eps, ...) for the new encoder groups.

        Explicit constructor values win. Otherwise each comes from the existing groups that contain encoder
        parameters, which must agree on it. Weight decay is read only from groups that contain decayed weights.
        """
        encoder_ids = {id(param) for param in encoder_params.values()}
        decayed_ids = {
            id(param) for name, param in encoder_params.items() if not is_excluded_from_weight_decay(name, param)
        }
        source_groups = [
            group for group in optimizer.param_groups if any(id(param) in encoder_ids for param in group['params'])
        ]
        decayed_groups = [
            group for group in optimizer.param_groups if any(id(param) in decayed_ids for param in group['params'])
        ]

        lr = self.lr
        if lr is None:
            lr = _single_value([_group_lr(group) for group in source_groups], 'learning rate', 'lr')
        weight_decay = self.weight_decay
        if weight_decay is None:
            weight_decay = _single_value(
                [float(group['weight_decay']) for group in decayed_groups if 'weight_decay' in group],
                'weight decay',
                'weight_decay',
            )

        inherited: dict[str, Any] = {}
        for group in source_groups:
            for key, value in group.items():
                if key in _OWN_GROUP_KEYS:
                    continue
                if key in inherited and not _same_value(inherited[key], value):
                    raise ValueError(
                        f"The optimizer groups that contain the encoder's parameters disagree on {key!r} "
                        f'({inherited[key]!r} vs {value!r}), so the layer-decay groups cannot inherit it. '
                        'Put all encoder parameters in groups with the same settings.'
                    )
                inherited.setdefault(key, value)
        return float(lr), float(weight_decay), inherited

    def _log_setup(
        self, optimizer: torch.optim.Optimizer, encoder_params: dict[str, nn.Parameter], logger: Logger
    ) -> None:
        settings = self._settings
        assert settings is not None
        frozen = sum(param.numel() for param in encoder_params.values() if not param.requires_grad)
        trainable = sum(param.numel() for param in encoder_params.values() if param.requires_grad)
        log.info(
            'LayerwiseUnfreezing froze %s of %s blocks (%s encoder parameters frozen, %s trainable), with '
            'layer decay %g from lr %.4g and weight decay %g',
            settings['num_frozen_blocks'],
            settings['depth'],
            f'{frozen:,}',
            f'{trainable:,}',
            settings['layer_decay'],
            settings['lr'],
            settings['weight_decay'],
        )
        for index, group in enumerate(optimizer.param_groups):
            log.info(
                'Optimizer group %d %s: lr %.4g, weight decay %g, %d tensors (%s parameters)',
                index,
                group.get('name', '(unnamed)'),
                _group_lr(group),
                group.get('weight_decay', 0.0),
                len(group['params']),
                f'{sum(param.numel() for param in group["params"]):,}',
            )
        logger.log_metrics(
            {'layerwise_unfreezing/frozen_params': frozen, 'layerwise_unfreezing/trainable_params': trainable}
        )

    def _check_schedulers(self, state: State) -> None:
        optimizer = ensure_tuple(state.optimizers)[0]
        group_lrs = [group.get('initial_lr') for group in optimizer.param_groups]
        for scheduler in state.schedulers:
            base_lrs = getattr(scheduler, 'base_lrs', None)
            if base_lrs is None:
                continue
            matches = len(base_lrs) == len(group_lrs) and all(
                group_lr is not None and math.isclose(float(base_lr), float(group_lr), rel_tol=1e-9, abs_tol=0.0)
                for base_lr, group_lr in zip(base_lrs, group_lrs, strict=True)
            )
            if not matches:
                raise ValueError(
                    f'{type(scheduler).__name__} has {len(base_lrs)} base learning rates that do not match the '
                    f"optimizer's {len(group_lrs)} groups, because it was built before LayerwiseUnfreezing replaced "
                    "the encoder's groups at Event.INIT. Pass a Composer scheduler such as "
                    'CosineAnnealingWithWarmupScheduler to the Trainer instead, because the Trainer builds it after '
                    'INIT.'
                )

    def state_dict(self) -> dict[str, Any]:
        """Return the resolved settings, or the constructor's settings before INIT."""
        if self._settings is not None:
            return dict(self._settings)
        return {
            'num_frozen_blocks': self.num_frozen_blocks,
            'layer_decay': self.layer_decay,
            'lr': self.lr,
            'weight_decay': self.weight_decay,
            'depth': None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that a checkpoint was made with the same settings, because its optimizer groups match only then.

        Raises:
            ValueError: If any resolved setting differs from the checkpoint's.
        """
        if self._settings is None:
            # Composer loads checkpoints after INIT; a direct call before INIT is checked once INIT resolves.
            self._pending_checkpoint_settings = dict(state)
            return
        self._check_checkpoint_settings(state)

    def _check_checkpoint_settings(self, saved: dict[str, Any]) -> None:
        current = self._settings
        assert current is not None
        differences = [
            f'{key}: checkpoint {saved.get(key)!r}, this run {value!r}'
            for key, value in current.items()
            if not _same_setting(saved.get(key), value)
        ]
        if differences:
            raise ValueError(
                'The checkpoint was made with other LayerwiseUnfreezing settings (' + '; '.join(differences) + '), '
                'so its optimizer groups do not match this run. Resume with the settings of the checkpoint, or '
                'load only its weights (load_weights_only=True) to start a new stage.'
            )


def _same_setting(saved: Any, current: Any) -> bool:
    if isinstance(saved, float) and isinstance(current, float):
        return math.isclose(saved, current, rel_tol=1e-9, abs_tol=0.0)
    return type(saved) is type(current) and saved == current


def _single_value(values: list[float], what: str, argument: str) -> float:
    """Return the one distinct value in ``values``, and raise ValueError if there is none or more than one."""
    distinct = sorted(set(values))
    if len(distinct) == 1:
        return distinct[0]
    if not distinct:
        raise ValueError(
            f"No optimizer group contains the encoder's parameters, so the {what} cannot be taken from the optimizer. "
            f'Pass {argument}= to LayerwiseUnfreezing.'
        )
    raise ValueError(
        f"The optimizer groups that contain the encoder's parameters have different values of {what} ({distinct}). "
        f'Pass {argument}= to LayerwiseUnfreezing to choose one.'
    )


def _remove_params_from_optimizer(optimizer: torch.optim.Optimizer, param_ids: set[int]) -> None:
    """Remove the parameters with these ids from every group, with their state, and drop groups left empty."""
    kept_groups = []
    for group in optimizer.param_groups:
        keep = [id(param) not in param_ids for param in group['params']]
        for param, kept in zip(group['params'], keep, strict=True):
            if not kept:
                optimizer.state.pop(param, None)
        if 'param_names' in group:
            group['param_names'] = [name for name, kept in zip(group['param_names'], keep, strict=True) if kept]
        group['params'] = [param for param, kept in zip(group['params'], keep, strict=True) if kept]
        if group['params'] or all(keep):
            kept_groups.append(group)
    optimizer.param_groups[:] = kept_groups
