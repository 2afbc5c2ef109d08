"""Registries of algorithms, callbacks and loggers that a training YAML names.

Each registry is a ``catalogue`` registry with entry points, so another installed package extends it without code
here: an entry point ``my_callback = my_package.callbacks:MyCallback`` in the group ``composer_maect_callbacks``
(``composer_maect_algorithms``, ``composer_maect_loggers``) makes ``callbacks: {my_callback: {...}}`` work. Code that
is not packaged registers at import time (``callbacks.register('my_callback', func=MyCallback)``) in a file listed
under the YAML's ``code_paths``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import catalogue
from composer import algorithms as composer_algorithms
from composer import callbacks as composer_callbacks
from composer import loggers as composer_loggers
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination

from composer_maect.algorithms import EMA, ContrastiveTuning, LayerwiseUnfreezing
from composer_maect.callbacks import KNNMonitor, ReconstructionImages

__all__ = ['algorithms', 'build', 'callbacks', 'loggers']

log = logging.getLogger(__name__)

algorithms = catalogue.create('composer_maect', 'algorithms', entry_points=True)
callbacks = catalogue.create('composer_maect', 'callbacks', entry_points=True)
loggers = catalogue.create('composer_maect', 'loggers', entry_points=True)

_EXPECTED_TYPES: dict[str, type] = {'algorithms': Algorithm, 'callbacks': Callback, 'loggers': LoggerDestination}
_REGISTRIES = {'algorithms': algorithms, 'callbacks': callbacks, 'loggers': loggers}

# Composer's own algorithms that apply to a ViT trained with this package.
# The package's EMA: Composer's, with a foreach update of the trainable parameters only.
algorithms.register('ema', func=EMA)
algorithms.register('gradient_clipping', func=composer_algorithms.GradientClipping)
algorithms.register('low_precision_layernorm', func=composer_algorithms.LowPrecisionLayerNorm)
algorithms.register('contrastive_tuning', func=ContrastiveTuning)
algorithms.register('layerwise_unfreezing', func=LayerwiseUnfreezing)

callbacks.register('speed_monitor', func=composer_callbacks.SpeedMonitor)
callbacks.register('lr_monitor', func=composer_callbacks.LRMonitor)
callbacks.register('memory_monitor', func=composer_callbacks.MemoryMonitor)
callbacks.register('memory_snapshot', func=composer_callbacks.MemorySnapshot)
callbacks.register('runtime_estimator', func=composer_callbacks.RuntimeEstimator)
callbacks.register('optimizer_monitor', func=composer_callbacks.OptimizerMonitor)
callbacks.register('nan_monitor', func=composer_callbacks.NaNMonitor)
callbacks.register('early_stopper', func=composer_callbacks.EarlyStopper)
callbacks.register('image_visualizer', func=composer_callbacks.ImageVisualizer)
callbacks.register('system_metrics_monitor', func=composer_callbacks.SystemMetricsMonitor)
callbacks.register('reconstruction_images', func=ReconstructionImages)
callbacks.register('knn_monitor', func=KNNMonitor)

# The logger classes import their optional packages (tensorboard, wandb, mlflow) when they are constructed, so a name is
# available here even where its package is missing, and building it then raises Composer's error that names the
# package to install.
loggers.register('console', func=composer_loggers.ConsoleLogger)
loggers.register('file', func=composer_loggers.FileLogger)
loggers.register('in_memory', func=composer_loggers.InMemoryLogger)
loggers.register('tensorboard', func=composer_loggers.TensorboardLogger)
loggers.register('wandb', func=composer_loggers.WandBLogger)
loggers.register('mlflow', func=composer_loggers.MLFlowLogger)
loggers.register('comet_ml', func=composer_loggers.CometMLLogger)
loggers.register('neptune', func=composer_loggers.NeptuneLogger)
loggers.register('remote_uploader_downloader', func=composer_loggers.RemoteUploaderDownloader)


def _lookup(kind: str, name: str) -> Callable[..., Any]:
    registry = _REGISTRIES[kind]
    try:
        return registry.get(name)
    except catalogue.RegistryError:
        names = sorted(registry.get_all())
        close = difflib.get_close_matches(name, names, n=1)
        suggestion = f" Did you mean '{close[0]}'?" if close else ''
        raise ValueError(
            f"Unknown {kind[:-1]} '{name}' in `{kind}`.{suggestion} Registered names: {', '.join(names)}. "
            f'Another package adds names through the entry point group composer_maect_{kind}.'
        ) from None


def build(kind: str, entries: Mapping[str, Mapping[str, Any] | None]) -> list[Any]:
    """Build every object of a YAML section (``algorithms``, ``callbacks`` or ``loggers``) from its registry.

    Args:
        kind: the section name.
        entries: ``{registered_name: keyword arguments or None}`` in YAML order.

    Raises:
        ValueError: if a name is not registered, its arguments are rejected, or it builds the wrong kind of object.
    """
    built = []
    for name, kwargs in entries.items():
        factory = _lookup(kind, name)
        try:
            instance = factory(**dict(kwargs or {}))
        except TypeError as error:
            raise ValueError(f'Invalid arguments for `{kind}.{name}` ({dict(kwargs or {})}): {error}') from error
        expected = _EXPECTED_TYPES[kind]
        if not isinstance(instance, expected):
            raise ValueError(
                f'`{kind}.{name}` built a {type(instance).__name__}, which is not a Composer {expected.__name__}.'
            )
        log.debug('Built %s %s from %s', kind[:-1], name, type(instance).__name__)
        built.append(instance)
    return built
