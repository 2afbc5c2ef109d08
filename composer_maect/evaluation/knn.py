"""Weighted k-nearest-neighbour classification of features, the k-NN evaluation of self-supervised encoders.

Each test (query) feature votes among its ``k`` most similar train features by cosine similarity. A neighbour with
similarity ``s`` adds the weight ``exp(s / temperature)`` to its class, and the class scores are the summed weights,
as in ``knn_classifier`` of facebookresearch/dino ``eval_knn.py`` (temperature 0.07). With ``standardize=True``
every feature dimension is first standardised with the mean and standard deviation of the train features, as
ml-jku/MIM-Refiner ``eval_knn_torchhub.py`` does. Features are then L2-normalised, and all arithmetic is in float32.

Labels may be any integers. Internally the distinct train labels, sorted, become contiguous class slots, so the
labels need not start at 0 or be contiguous. Test rows are processed in chunks of ``chunk_size``, so the similarity
matrix in memory at any time is ``[chunk_size, num_train]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

__all__ = ['MIN_TEMPERATURE', 'knn_accuracy', 'knn_predict']

# The largest weight is exp(1 / temperature), at cosine similarity 1. float32 overflows above exp(88.72), so the
# temperature must be at least 1/88.
MIN_TEMPERATURE = 1 / 88

# Dimensions whose train standard deviation is at most this are only centred, not divided, like scikit-learn's
# StandardScaler does for constant features. Dividing by a near-zero value would blow up any test deviation.
_MIN_STD = 1e-6


def _check_features(name: str, features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(features).__name__}.')
    if features.ndim != 2:
        raise ValueError(f'{name} must have shape [samples, dim], got shape {tuple(features.shape)}.')
    if not features.dtype.is_floating_point:
        raise TypeError(f'{name} must be a floating-point tensor, got dtype {features.dtype}.')
    non_finite_rows = int((~torch.isfinite(features)).any(dim=1).sum())
    if non_finite_rows:
        raise ValueError(
            f'{name} has {non_finite_rows} rows with NaN or infinite values. The encoder may have diverged.'
        )


def _check_labels(name: str, labels: torch.Tensor, num_samples: int, features_name: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(labels).__name__}.')
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f'{name} must be an integer tensor, got dtype {labels.dtype}.')
    if labels.ndim != 1 or labels.shape[0] != num_samples:
        raise ValueError(
            f'{name} must have shape [{num_samples}] to match {features_name}, got shape {tuple(labels.shape)}.'
        )


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}.')


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f'temperature must be a finite number, got {temperature!r}.')
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f'temperature must be at least {MIN_TEMPERATURE:.4f} (1/88), got {temperature!r}. Below that the '
            'neighbour weight exp(1 / temperature) overflows float32.'
        )


def _check_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    temperature: float,
    chunk_size: int,
) -> None:
    _check_features('train_features', train_features)
    _check_features('test_features', test_features)
    _check_labels('train_labels', train_labels, train_features.shape[0], 'train_features')
    if train_features.shape[0] == 0:
        raise ValueError('train_features is empty. k-NN needs at least one train sample.')
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f'test_features has dimension {test_features.shape[1]} but train_features has '
            f'{train_features.shape[1]}. Extract both with the same encoder and pooling.'
        )
    _check_temperature(temperature)
    _check_positive_int('chunk_size', chunk_size)


def _clip_k(k: int, num_train: int) -> int:
    """Return ``k``, or ``num_train`` with a warning when ``k`` is larger. The warning points at the public caller."""
    _check_positive_int('k', k)
    if k > num_train:
        # stacklevel 3: this function, then knn_predict or knn_accuracy, then their caller.
        warnings.warn(
            f'k={k} is larger than the {num_train} train samples. Using k={num_train} instead.',
            stacklevel=3,
        )
        return num_train
    return k


def _normalize(
    train_features: torch.Tensor, test_features: torch.Tensor, standardize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float32, L2-normalised train and test features on the train features' device."""
    train = train_features.float()
    test = test_features.to(device=train.device, dtype=torch.float32)
    if standardize:
        mean = train.mean(dim=0)
        std = train.std(dim=0, correction=0)
        std = torch.where(std > _MIN_STD, std, torch.ones_like(std))
        train = (train - mean) / std
        test = (test - mean) / std
    return F.normalize(train, dim=1), F.normalize(test, dim=1)


def _class_slots(train_labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the sorted distinct train labels ``[C]`` and each train sample's class slot ``[N]``."""
    labels = train_labels.to(device=device, dtype=torch.int64)
    classes = torch.unique(labels, sorted=True)
    return classes, torch.searchsorted(classes, labels)


def _test_slots(classes: torch.Tensor, test_labels: torch.Tensor) -> torch.Tensor:
    """Map test labels to class slots, with -1 for labels that no train sample has."""
    labels = test_labels.to(device=classes.device, dtype=torch.int64)
    positions = torch.searchsorted(classes, labels).clamp(max=classes.shape[0] - 1)
    return torch.where(classes[positions] == labels, positions, torch.full_like(positions, -1))


def _neighbours(
    train: torch.Tensor, test: torch.Tensor, k: int, chunk_size: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, similarities [c, k], train_indices [c, k])`` per chunk of test rows, most similar first."""
    for start in range(0, test.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, test.shape[0]))
        similarities = test[rows] @ train.T  # [c, N]
        top = similarities.topk(k, dim=1, largest=True, sorted=True)
        yield rows, top.values, top.indices


def _class_scores(
    similarities: torch.Tensor, neighbour_slots: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Sum the weights ``exp(similarity / temperature)`` ``[c, k]`` per class slot into scores ``[c, C]``."""
    weights = torch.exp(similarities / temperature)
    scores = torch.zeros((similarities.shape[0], num_classes), dtype=torch.float32, device=similarities.device)
    return scores.scatter_add_(1, neighbour_slots, weights)


def _vote_counts(neighbour_slots: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Count the neighbours ``[c, k]`` per class slot into ``[c, C]``."""
    counts = torch.zeros((neighbour_slots.shape[0], num_classes), dtype=torch.int64, device=neighbour_slots.device)
    return counts.scatter_add_(1, neighbour_slots, torch.ones_like(neighbour_slots))


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int = 10,
    temperature: float = 0.07,
    standardize: bool = False,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Score every class for each test feature by a similarity-weighted vote of its ``k`` nearest train features.

    Args:
        train_features: the neighbour bank ``[N, D]``.
        train_labels: integer labels ``[N]`` of the bank.
        test_features: queries ``[M, D]``.
        k: neighbours per query. A ``k`` above ``N`` is clipped to ``N`` with a warning.
        temperature: the vote of a neighbour with cosine similarity ``s`` is ``exp(s / temperature)``.
        standardize: standardise every dimension with the train mean and standard deviation before the L2
            normalisation.
        chunk_size: test rows per similarity matrix ``[chunk_size, N]``.

    Returns:
        Float32 scores ``[M, C]`` on the device of ``train_features``, where column ``j`` belongs to the ``j``-th
        smallest distinct train label (``torch.unique(train_labels)[j]``). A class that no neighbour voted for
        scores 0.

    Raises:
        TypeError: non-tensor inputs, non-float features or non-integer labels.
        ValueError: mismatched shapes, an empty bank, NaN or infinite features, a ``k`` or ``chunk_size`` below 1,
            or a ``temperature`` below ``MIN_TEMPERATURE``.
    """
    _check_inputs(train_features, train_labels, test_features, temperature, chunk_size)
    k = _clip_k(k, train_features.shape[0])
    train, test = _normalize(train_features, test_features, standardize)
    classes, train_slots = _class_slots(train_labels, train.device)

    scores = torch.zeros((test.shape[0], classes.shape[0]), dtype=torch.float32, device=train.device)
    for rows, similarities, neighbours in _neighbours(train, test, k, chunk_size):
        scores[rows] = _class_scores(similarities, train_slots[neighbours], classes.shape[0], temperature)
    return scores


def _unique_positive_ints(name: str, values: Iterable[int]) -> list[int]:
    if isinstance(values, int):
        values = [values]
    values = list(values)
    if not values:
        raise ValueError(f'{name} must contain at least one value.')
    for value in values:
        _check_positive_int(f'every value of {name}', value)
    return sorted(set(values))


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Iterable[int] = (10,),
    temperature: float = 0.07,
    standardize: bool = False,
    chunk_size: int = 1024,
    topk: Iterable[int] = (1, 5),
) -> dict[str, float]:
    """Measure the k-NN top-t accuracy and neighbour purity of ``test_features`` against the train bank.

    The class scores are those of :func:`knn_predict`. A query is correct at top-``t`` when its label is among the
    ``t`` highest-scoring classes that received at least one vote. With fewer than ``t`` classes in the bank, ``t``
    is clipped to the number of classes. DINO's ``eval_knn.py`` instead takes the first ``min(t, k)`` classes of
    the sorted scores, which may include classes without votes in arbitrary order, so its top-5 can be higher.

    Neighbour purity is the fraction of a query's ``k`` neighbours that have the query's label. Both metrics are
    averaged over the queries. Queries whose label no train sample has count as wrong (with a warning).

    Args:
        train_features, train_labels, test_features: as in :func:`knn_predict`.
        test_labels: integer labels ``[M]`` of the queries, from the same label set as ``train_labels``.
        ks: the values of ``k`` to evaluate. The nearest neighbours are searched once, for the largest ``k``.
            Each ``k`` above the bank size is clipped to it with a warning.
        temperature, standardize, chunk_size: as in :func:`knn_predict`.
        topk: the values of ``t`` for top-``t`` accuracy.

    Returns:
        ``{'top{t}@{k}': accuracy, 'purity@{k}': purity}`` for every requested ``t`` and ``k``, as floats in
        ``[0, 1]``. The keys use the requested values, also where they were clipped.

    Raises:
        TypeError, ValueError: as :func:`knn_predict`, and also for an empty query set, mismatched test labels or
            an empty or non-positive ``ks`` or ``topk``.
    """
    _check_inputs(train_features, train_labels, test_features, temperature, chunk_size)
    _check_labels('test_labels', test_labels, test_features.shape[0], 'test_features')
    if test_features.shape[0] == 0:
        raise ValueError('test_features is empty. k-NN accuracy needs at least one query.')
    ks = _unique_positive_ints('ks', ks)
    topk = _unique_positive_ints('topk', topk)
    num_train = train_features.shape[0]
    clipped_ks = {}
    for k in ks:
        clipped_ks[k] = _clip_k(k, num_train)

    train, test = _normalize(train_features, test_features, standardize)
    classes, train_slots = _class_slots(train_labels, train.device)
    num_classes = classes.shape[0]
    query_slots = _test_slots(classes, test_labels)
    num_unknown = int((query_slots < 0).sum())
    if num_unknown:
        warnings.warn(
            f'{num_unknown} of {query_slots.shape[0]} queries have labels that no train sample has. They count as '
            'wrong. Use a bank that covers every class.',
            stacklevel=2,
        )

    hits = {(k, t): 0.0 for k in ks for t in topk}
    purity = dict.fromkeys(ks, 0.0)
    for rows, similarities, neighbours in _neighbours(train, test, max(clipped_ks.values()), chunk_size):
        slots = query_slots[rows]
        neighbour_slots = train_slots[neighbours]  # [c, k_max]
        for k in ks:
            k_used = clipped_ks[k]
            k_slots = neighbour_slots[:, :k_used]
            scores = _class_scores(similarities[:, :k_used], k_slots, num_classes, temperature)
            # Classes without votes score 0 and must not count as predictions, whatever order topk puts them in.
            votes = _vote_counts(k_slots, num_classes)
            purity[k] += (k_slots == slots[:, None]).float().mean(dim=1).sum().item()
            for t in topk:
                top_classes = scores.topk(min(t, num_classes), dim=1).indices
                voted = votes.gather(1, top_classes) > 0
                hits[(k, t)] += ((top_classes == slots[:, None]) & voted).any(dim=1).sum().item()

    num_queries = test.shape[0]
    results: dict[str, float] = {}
    for k in ks:
        for t in topk:
            results[f'top{t}@{k}'] = hits[(k, t)] / num_queries
        results[f'purity@{k}'] = purity[k] / num_queries
    return results
