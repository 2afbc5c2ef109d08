"""Callback that measures the k-NN accuracy of the encoder's pooled features during training."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from composer.algorithms import EMA
from composer.core import Callback, Event, State, Time, TimeUnit, get_precision_context
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader

from composer_maect.data.dataset import build_image_dataloader
from composer_maect.data.decode import check_decoder
from composer_maect.data.transforms import build_transform
from composer_maect.evaluation.features import extract_features
from composer_maect.evaluation.knn import MIN_TEMPERATURE, knn_accuracy
from composer_maect.fsdp1_forward import fsdp1_forward_features
from composer_maect.models.pooling import check_pooling

__all__ = ['KNNMonitor', 'find_vision_transformer']

log = logging.getLogger(__name__)

# Accuracy at these top-t values is logged for every k.
_TOPK = (1, 5)

# Interval units that create_interval_scheduler checks at BATCH_END or EPOCH_END.
_INTERVAL_UNITS = (
    TimeUnit.BATCH,
    TimeUnit.EPOCH,
    TimeUnit.SAMPLE,
    TimeUnit.TOKEN,
    TimeUnit.DURATION,
    TimeUnit.SECOND,
)

# With a remote, the shards are downloaded into this sub-folder of train_local or val_local, followed by 'train' or
# 'val'. Streaming rejects two live datasets that share a local folder and have a remote, so the monitor must not
# reuse the training dataloader's cache folder, and its train and val caches must differ.
_CACHE_SUBFOLDER = 'knn_monitor'


def find_vision_transformer(model: nn.Module) -> VisionTransformer:
    """Return the only timm ``VisionTransformer`` among the submodules of ``model``, also inside a DDP wrapper.

    Raises:
        ValueError: ``model`` contains no ``VisionTransformer`` or more than one.
    """
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, VisionTransformer)]
    if len(found) == 1:
        return found[0][1]
    if not found:
        raise ValueError(
            f'KNNMonitor found no timm VisionTransformer in the model ({type(model).__name__}). It evaluates the '
            'features of a timm ViT encoder, so remove the callback for other models.'
        )
    names = [name or '<the model itself>' for name, _ in found]
    raise ValueError(
        f'KNNMonitor found {len(found)} timm VisionTransformers in the model, at {names}, but needs exactly one to '
        'know which encoder to evaluate.'
    )


def _is_complete_split(folder: str) -> bool:
    """Return whether ``folder`` has an MDS ``index.json`` and, for every shard it lists, the raw or zipped file."""
    index_path = os.path.join(folder, 'index.json')
    if not os.path.isfile(index_path):
        return False
    try:
        with open(index_path) as file:
            shards = json.load(file)['shards']
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for shard in shards:
        basenames = [(shard.get(key) or {}).get('basename') for key in ('raw_data', 'zip_data')]
        if not any(name and os.path.isfile(os.path.join(folder, name)) for name in basenames):
            return False
    return True


def _single_ema(state: State) -> EMA | None:
    emas = [algorithm for algorithm in state.algorithms if isinstance(algorithm, EMA)]
    if len(emas) > 1:
        raise ValueError(
            f'KNNMonitor(use_ema=True) found {len(emas)} EMA algorithms and cannot tell which weights to evaluate. '
            'Keep one EMA algorithm, or set use_ema=False to evaluate the training weights.'
        )
    return emas[0] if emas else None


@contextlib.contextmanager
def _ema_weights(ema: EMA, model: nn.Module) -> Iterator[None]:
    """Put the EMA weights into ``model`` for the duration of the context, then put the training weights back.

    EMA.get_ema_model copies the EMA weights over the training weights without keeping a copy, so this swaps them
    with EMAParameters.swap_params instead, as the EMA algorithm does around evaluation. Two swaps restore every
    training parameter and buffer exactly. When the EMA weights are already in the model (the EMA algorithm puts
    them there for checkpoint events), they stay there.
    """
    if ema.ema_weights_active:
        yield
        return
    ema.ema_model.move_params_to_device(destination_model=model)
    ema.ema_model.swap_params(model=model)
    ema.ema_weights_active = True
    try:
        yield
    finally:
        ema.ema_model.swap_params(model=model)
        ema.ema_weights_active = False


def _parse_interval(interval: str | int | Time) -> Time:
    time_interval = Time.from_input(interval, TimeUnit.EPOCH)
    if time_interval.unit not in _INTERVAL_UNITS or time_interval.value <= 0:
        units = ', '.join(unit.value for unit in _INTERVAL_UNITS)
        raise ValueError(
            f"interval must be a positive Time in one of the units {units} (e.g. '1ep' or '500ba'), or an int "
            f'number of epochs, got {interval!r}.'
        )
    return time_interval


def _parse_ks(k: int | Sequence[int]) -> tuple[int, ...]:
    values = [k] if isinstance(k, int) else list(k)
    if not values or any(isinstance(value, bool) or not isinstance(value, int) or value < 1 for value in values):
        raise ValueError(f'k must be a positive int or a non-empty list of positive ints, got {k!r}.')
    return tuple(sorted(set(values)))


def _check_optional_positive_int(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int or None, got {value!r}.')


class KNNMonitor(Callback):
    """Log the weighted k-NN accuracy of the encoder's pooled features on a labelled val split during training.

    The train split is the neighbour bank and the val split gives the queries. Both are read with the ``'eval'``
    view pipeline (resize and centre crop, no augmentation) and encoded by the single timm ``VisionTransformer``
    in the model. Its final-LayerNorm tokens are pooled (CLS token or mean of patch tokens), and each query is
    classified by the votes ``exp(cosine similarity / temperature)`` of its ``k`` nearest bank features (see
    :func:`composer_maect.evaluation.knn_accuracy`).

    With ``use_ema`` and a Composer ``EMA`` algorithm that has started, the EMA weights are evaluated, and the
    training weights are back in the model afterwards, bit for bit. Before the EMA starts, and without one, the
    training weights are evaluated.

    Events: at ``INIT`` it builds the two dataloaders. It evaluates at ``FIT_START`` (when ``at_fit_start``), at
    ``BATCH_END`` or ``EPOCH_END`` when ``interval`` has passed, and at ``FIT_END`` unless it already evaluated
    after the last batch. Each evaluation logs, through ``logger.log_metrics``, ``knn/top1@{k}``, ``knn/top5@{k}``
    and ``knn/purity@{k}`` for every ``k``, and ``knn/uses_ema`` (1 for EMA weights, 0 for training weights). Rank 0
    also logs one INFO line. Every rank runs the forward passes on its share of the data, which FSDP needs, and the
    features of all ranks are gathered, so every rank computes the same numbers. The checkpointed state is
    ``last_results``, the latest logged metrics.

    Args:
        train_local: the train split's MDS folder (with ``index.json``), or with ``train_remote`` a cache folder.
            With a remote, the shards are downloaded into ``<train_local>/knn_monitor/train``, unless
            ``train_local`` already contains every shard of the split, which is then read in place.
        val_local: the same for the val split. Its cache is ``<val_local>/knn_monitor/val``.
        img_size: side of the square images given to the encoder, in pixels.
        mean, std: per-channel normalisation of the images, on the 0..1 scale (default: timm's ImageNet values).
        resize_size: side the images are resized to before the centre crop to ``img_size`` (default
            ``img_size × 256 / 224``); set it to ``img_size`` to keep the whole image.
        pooling: ``'cls'`` (CLS token) or ``'mean_patch'`` (mean of the patch tokens).
        k: the number of neighbours, or a list of numbers to log each of.
        temperature: the vote weight of a neighbour with cosine similarity ``s`` is ``exp(s / temperature)``.
        standardize: standardise every feature dimension with the bank's mean and standard deviation before the
            L2 normalisation.
        interval: how often to evaluate: a Time string (``'1ep'``, ``'500ba'``, ``'0.25dur'``) or an int number of
            epochs.
        batch_size: images per forward pass on each rank.
        num_workers: DataLoader worker processes per split.
        decoder: the image decoder of ``ImageStreamingDataset``: ``'auto'`` (JPEGs with
            ``torchvision.io.decode_jpeg``, other formats with PIL) or ``'pil'``.
        train_remote, val_remote: where the split's shards live (``s3://...`` or another Streaming remote), or None
            to read the local folders.
        max_train_samples: use at most this many train samples as the bank (the first ones in the split's order),
            or None for all.
        at_fit_start: also evaluate before the first training batch (not when a run resumes).
        use_ema: evaluate the weights of a started EMA algorithm instead of the training weights.

    Attributes:
        last_results: the metrics of the latest evaluation, keyed as logged. Empty before the first one.
        first_results: the metrics of the first evaluation of this run (saved in checkpoints, like
            ``last_results``).

    Raises:
        ValueError: invalid arguments (the message names the value). At ``INIT``, also more than one EMA algorithm
            with ``use_ema``, and the errors of ``build_image_dataloader``, such as ``FileNotFoundError`` for a
            local folder without shards.
    """

    def __init__(
        self,
        train_local: str,
        val_local: str,
        *,
        img_size: int,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        resize_size: int | None = None,
        pooling: str = 'cls',
        k: int | Sequence[int] = 10,
        temperature: float = 0.07,
        standardize: bool = False,
        interval: str | int | Time = '1ep',
        batch_size: int = 256,
        num_workers: int = 0,
        decoder: str = 'auto',
        train_remote: str | None = None,
        val_remote: str | None = None,
        max_train_samples: int | None = None,
        at_fit_start: bool = True,
        use_ema: bool = True,
    ) -> None:
        for name, path in (('train_local', train_local), ('val_local', val_local)):
            if not isinstance(path, str) or not path:
                raise ValueError(f'{name} must be a non-empty folder path, got {path!r}.')
        check_pooling(pooling)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f'temperature must be a number, got {temperature!r}.')
        if not temperature >= MIN_TEMPERATURE:
            raise ValueError(
                f'temperature must be at least {MIN_TEMPERATURE:.4f} (1/88), got {temperature!r}. Below that the '
                'neighbour weight exp(1 / temperature) overflows float32.'
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f'num_workers must be a non-negative int, got {num_workers!r}.')
        _check_optional_positive_int('max_train_samples', max_train_samples)
        self.decoder = check_decoder(decoder)

        self.train_local = train_local
        self.val_local = val_local
        self.train_remote = train_remote
        self.val_remote = val_remote
        self.pooling = pooling
        self.ks = _parse_ks(k)
        self.temperature = float(temperature)
        self.standardize = bool(standardize)
        self.interval = _parse_interval(interval)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_train_samples = max_train_samples
        self.at_fit_start = bool(at_fit_start)
        self.use_ema = bool(use_ema)
        # Built here so that an invalid img_size, mean or std fails at construction.
        eval_options = {} if resize_size is None else {'resize_size': resize_size}
        self.transform = build_transform('eval', img_size=img_size, mean=mean, std=std, **eval_options)

        self.last_results: dict[str, float] = {}
        self.first_results: dict[str, float] = {}
        self._is_due = create_interval_scheduler(self.interval, include_end_of_training=False, checkpoint_events=False)
        self._train_loader: DataLoader | None = None
        self._val_loader: DataLoader | None = None
        self._last_evaluated_batch: int | None = None

    def init(self, state: State, logger: Logger) -> None:
        del logger
        if self.use_ema:
            _single_ema(state)
        if self._train_loader is None:
            self._train_loader = self._build_loader(self.train_local, self.train_remote, 'train')
        if self._val_loader is None:
            self._val_loader = self._build_loader(self.val_local, self.val_remote, 'val')

    def fit_start(self, state: State, logger: Logger) -> None:
        find_vision_transformer(state.model)  # fails before training if the model has no single ViT
        # A resumed run has already evaluated its starting weights.
        if self.at_fit_start and int(state.timestamp.batch) == 0:
            self.evaluate(state, logger)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._is_due(state, Event.BATCH_END):
            self.evaluate(state, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self._is_due(state, Event.EPOCH_END):
            self.evaluate(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._last_evaluated_batch != int(state.timestamp.batch):
            self.evaluate(state, logger)

    def state_dict(self) -> dict[str, Any]:
        return {'last_results': dict(self.last_results), 'first_results': dict(self.first_results)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ('last_results', 'first_results'):
            results = state.get(key, {})
            if not isinstance(results, Mapping):
                raise ValueError(f'KNNMonitor state has {key} of type {type(results).__name__}, expected a dict.')
            setattr(self, key, {str(name): float(value) for name, value in results.items()})

    def evaluate(self, state: State, logger: Logger) -> dict[str, float]:
        """Compute, log and return the k-NN metrics of the model in ``state``. Every rank must call it."""
        if self._train_loader is None or self._val_loader is None:
            raise RuntimeError('KNNMonitor builds its dataloaders at Event.INIT. Pass it to a Trainer before use.')
        # Under FSDP1, vit.forward_features runs through the ViT's wrapper, which gathers its parameters. FSDP2
        # registers it as a forward method.
        vit = find_vision_transformer(state.model)
        ema = _single_ema(state) if self.use_ema else None
        uses_ema = ema is not None and ema.ema_started and ema.ema_model is not None

        start = time.perf_counter()
        weights = _ema_weights(ema, state.model) if uses_ema else contextlib.nullcontext()
        routed = fsdp1_forward_features(state.model, vit)
        with weights, routed, get_precision_context(state.precision, state.precision_config):
            bank_features, bank_labels, _ = extract_features(
                vit, self._train_loader, pooling=self.pooling, max_samples=self.max_train_samples
            )
            query_features, query_labels, _ = extract_features(vit, self._val_loader, pooling=self.pooling)

        device = next(vit.parameters()).device
        accuracy = knn_accuracy(
            bank_features.to(device),
            bank_labels,
            query_features,
            query_labels,
            ks=self.ks,
            temperature=self.temperature,
            standardize=self.standardize,
            topk=_TOPK,
        )
        metrics: dict[str, float] = {f'knn/{name}': value for name, value in accuracy.items()}
        metrics['knn/uses_ema'] = 1 if uses_ema else 0
        logger.log_metrics(metrics)
        self.last_results = metrics
        if not self.first_results:
            self.first_results = dict(metrics)
        self._last_evaluated_batch = int(state.timestamp.batch)

        if dist.get_global_rank() == 0:
            summary = ', '.join(f'{name} {value:.4f}' for name, value in accuracy.items())
            log.info(
                'k-NN at epoch %d, batch %d with %s weights and %s pooling: %s (bank %d, queries %d, %.1f s).',
                int(state.timestamp.epoch),
                int(state.timestamp.batch),
                'EMA' if uses_ema else 'training',
                self.pooling,
                summary,
                bank_features.shape[0],
                query_features.shape[0],
                time.perf_counter() - start,
            )
        return dict(metrics)

    def _build_loader(self, local: str, remote: str | None, split: str) -> DataLoader:
        loader_local, loader_remote = local, None
        if remote is not None:
            if _is_complete_split(local):
                log.info(
                    'KNNMonitor reads the %s split from %s, which contains every shard, instead of downloading it '
                    'from %s.',
                    split,
                    local,
                    remote,
                )
            else:
                loader_local, loader_remote = os.path.join(local, _CACHE_SUBFOLDER, split), remote
        return build_image_dataloader(
            local=loader_local,
            remote=loader_remote,
            batch_size=self.batch_size,
            transform=self.transform,
            shuffle=False,
            drop_last=False,
            decoder=self.decoder,
            num_workers=self.num_workers,
        )
