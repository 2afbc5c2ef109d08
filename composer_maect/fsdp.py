"""Check a YAML's ``fsdp_config`` against the FSDP version Composer will build, and fill this package's defaults.

Composer 0.32.1 turns ``parallelism_config={'fsdp': mapping}`` into FSDP1 (``FSDPConfig``), or into FSDP2
(``FSDP2Config``) when the environment has ``FSDP_VERSION=2``. Neither rejects a misspelt key: ``FSDPConfig`` stores
any keyword as an attribute, and FSDP2 drops every key it does not know with a warning. :func:`fsdp_settings` raises
instead, so that a setting never silently does nothing.

What each version accepts here:

* FSDP1: the fields of ``composer.utils.parallelism.FSDPConfig``.
* FSDP2: the settable fields of ``FSDP2Config``, plus the FSDP1 keys whose value is what FSDP2 always does
  (``use_orig_params: true``, ``sharding_strategy: FULL_SHARD``, ``auto_wrap: true``,
  ``activation_checkpointing_reentrant: false``, ``sharded_ckpt_prefix_dir: ep{epoch}-ba{batch}``). Those are dropped
  before they reach Composer, so one recipe runs under both versions.

``device_mesh`` is left out of both, because a YAML value cannot be a ``DeviceMesh``.

:func:`average_gloo_gradients` works around gloo in torch 2.7, whose ``reduce_scatter_tensor`` sums when asked to
average, so that FSDP2 on CPUs would train with gradients ``world_size`` times too large.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from composer.utils.parallelism import FSDP2Config, FSDPConfig
from torch import nn

from composer_maect.config import ConfigError

__all__ = [
    'FSDP1_KEYS',
    'FSDP2_FIXED_FSDP1_SETTINGS',
    'FSDP2_KEYS',
    'FSDPConfigError',
    'average_gloo_gradients',
    'fsdp_settings',
    'fsdp_version',
]

log = logging.getLogger(__name__)

FSDP1_KEYS = frozenset(f.name for f in dataclasses.fields(FSDPConfig) if not f.name.startswith('_')) - {'device_mesh'}
FSDP2_KEYS = frozenset(FSDP2Config.settable_attrs()) - {'device_mesh'}
# FSDP1 keys and the value that FSDP2 always has. FSDP2 keeps the original parameters, shards every unit fully
# (reshard_after_forward decides when they are gathered again), wraps through fsdp_wrap_fn, checkpoints activations
# without reentrant autograd and names sharded checkpoint folders ep{epoch}-ba{batch}.
FSDP2_FIXED_FSDP1_SETTINGS: dict[str, Any] = {
    'use_orig_params': True,
    'sharding_strategy': 'FULL_SHARD',
    'auto_wrap': True,
    'activation_checkpointing_reentrant': False,
    'sharded_ckpt_prefix_dir': 'ep{epoch}-ba{batch}',
}
STATE_DICT_TYPES = ('full', 'sharded')


class FSDPConfigError(ConfigError):
    """An ``fsdp_config`` key or value that the chosen FSDP version does not accept."""


def fsdp_version() -> int:
    """Return the FSDP version that Composer 0.32.1 builds from a mapping: 2 when ``FSDP_VERSION=2``, else 1."""
    return 2 if os.environ.get('FSDP_VERSION', '1') == '2' else 1


def fsdp_settings(fsdp_config: Mapping[str, Any], version: int | None = None) -> dict[str, Any]:
    """Validate ``fsdp_config`` for FSDP ``version`` and return the mapping to pass as ``parallelism_config['fsdp']``.

    Under FSDP1 the result sets ``activation_checkpointing_reentrant: false`` unless the mapping sets it, because
    Composer's default (reentrant) gives no gradient to the parameters of a checkpointed block when none of the
    block's inputs requires a gradient. In MAE-CT that is the case for every block above frozen lower blocks.

    Args:
        fsdp_config: The YAML's ``fsdp_config`` mapping.
        version: 1 or 2; by default the version that ``FSDP_VERSION`` selects (see :func:`fsdp_version`).

    Raises:
        FSDPConfigError: If a key is unknown to the chosen version, or a value cannot be honoured by it. Also if
            ``use_orig_params`` is false: this package's optimizers have several parameter groups and freeze some
            parameters, which Composer's FSDP1 supports only with the original parameters.
    """
    version = fsdp_version() if version is None else version
    if version not in (1, 2):
        raise FSDPConfigError(f'FSDP version must be 1 or 2, got {version!r}.')
    settings = dict(fsdp_config)
    _check_state_dict_type(settings)
    if version == 1:
        return _fsdp1_settings(settings)
    return _fsdp2_settings(settings)


def _check_state_dict_type(settings: dict[str, Any]) -> None:
    value = settings.get('state_dict_type')
    if value is not None and value not in STATE_DICT_TYPES:
        raise FSDPConfigError(
            f"fsdp_config.state_dict_type is {value!r}; expected 'full' (one checkpoint file, written by rank 0) or "
            "'sharded' (a folder with one shard per rank)."
        )


def _unknown_key_error(key: str, version: int, hint: str = '') -> FSDPConfigError:
    accepted = sorted(FSDP1_KEYS if version == 1 else FSDP2_KEYS | FSDP2_FIXED_FSDP1_SETTINGS.keys())
    switch = 'unset FSDP_VERSION to use FSDP1' if version == 2 else 'set FSDP_VERSION=2 to use FSDP2'
    return FSDPConfigError(
        f'fsdp_config.{key} is not a setting of FSDP{version} in Composer 0.32.1.{hint} Remove it, or {switch} if it '
        f'is a setting of that version. FSDP{version} accepts: {", ".join(accepted)}.'
    )


def _fsdp1_settings(settings: dict[str, Any]) -> dict[str, Any]:
    for key in settings:
        if key in FSDP1_KEYS:
            continue
        hint = ''
        if key == 'reshard_after_forward':
            hint = ' FSDP1 sets this through sharding_strategy (FULL_SHARD reshards, SHARD_GRAD_OP does not).'
        raise _unknown_key_error(key, 1, hint)
    if settings.get('use_orig_params') is False:
        raise FSDPConfigError(
            'fsdp_config.use_orig_params is false, but FSDP1 then puts frozen and trainable parameters of one unit '
            '(the frozen patch embedding next to the trainable final norm, the EMA target projector next to the '
            'projector) into one flat parameter, and Composer rebuilds several optimizer parameter groups only with '
            'the original parameters. Set use_orig_params: true.'
        )
    settings.setdefault('activation_checkpointing_reentrant', False)
    return settings


def _fsdp2_settings(settings: dict[str, Any]) -> dict[str, Any]:
    result = {}
    for key, value in settings.items():
        if key in FSDP2_KEYS:
            result[key] = value
            continue
        if key not in FSDP2_FIXED_FSDP1_SETTINGS:
            raise _unknown_key_error(key, 2)
        fixed = FSDP2_FIXED_FSDP1_SETTINGS[key]
        # Composer reads sharding_strategy case-insensitively.
        same = value.upper() == fixed if key == 'sharding_strategy' and isinstance(value, str) else value == fixed
        if not same:
            raise FSDPConfigError(
                f'fsdp_config.{key} is {value!r}, but FSDP2 always runs as {key}: {fixed!r}. Set it to {fixed!r} or '
                'remove it, or unset FSDP_VERSION to use FSDP1.'
            )
    if 'sharding_strategy' in settings and result.get('reshard_after_forward') is False:
        raise FSDPConfigError(
            'fsdp_config sets sharding_strategy: FULL_SHARD and reshard_after_forward: false, which contradict each '
            'other under FSDP2. Remove sharding_strategy, or set reshard_after_forward: true.'
        )
    return result


def _reduce_scatter_averages() -> bool:
    """Return whether ``reduce_scatter_tensor`` with ``ReduceOp.AVG`` averages on the default process group."""
    world_size = dist.get_world_size()
    ones = torch.ones(world_size)
    output = torch.empty(1)
    dist.reduce_scatter_tensor(output, ones, op=dist.ReduceOp.AVG)
    return bool(output.item() == 1.0)


def average_gloo_gradients(model: nn.Module) -> int:
    """Divide FSDP2's reduce-scattered gradients by the world size where the gloo backend sums instead of averaging.

    FSDP2 (torch 2.7) reduce-scatters float32 and bfloat16 gradients with ``ReduceOp.AVG``, which gloo's
    ``reduce_scatter_tensor`` carries out as a sum. This function checks that with one reduce-scatter of ones, and when
    gloo sums, it gives every FSDP2 unit in ``model`` an all-reduce hook that divides its reduced gradient shard by the
    world size. Call it on every rank after the Trainer has wrapped the model; it is a collective when it checks.

    NOTE: a unit that reduces in float16 is predivided by FSDP2 and reduced with a sum, so this hook would divide it
    twice. On CPUs FSDP2 reduces in float32 or bfloat16 unless a custom mixed-precision policy sets float16.

    Returns:
        The number of FSDP2 units that got the hook: 0 without a process group of more than one rank, with a backend
        other than gloo, or when gloo averages correctly.
    """
    from torch.distributed.fsdp import FSDPModule

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    if dist.get_backend() != 'gloo':
        return 0
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not units or _reduce_scatter_averages():
        return 0
    world_size = dist.get_world_size()

    def divide(reduced: torch.Tensor) -> None:
        reduced.div_(world_size)

    for unit in units:
        unit.set_all_reduce_hook(divide)
    log.info(
        'gloo sums where FSDP2 averages gradients: dividing the gradients of %d FSDP2 units by %d',
        len(units),
        world_size,
    )
    return len(units)
