"""Low-shot classification: multinomial logistic regression on a few labelled train images per class.

For each setting (``n`` images per class, or a percentage of each class) several seeded splits are drawn. Each split
trains scikit-learn's ``LogisticRegression`` (multinomial, L-BFGS, L2 penalty) on the standardised features of its
images, and is scored on the whole test set. The result is the mean and standard deviation over the splits, the
summary that MSN and MAE-CT report for their 1, 2 and 5 images-per-class splits.

A split is drawn without looking at label values: one seeded permutation of all train samples, then the first
``n`` samples of each class in that order. Renaming the classes therefore leaves every split unchanged.

NOTE: MAE-CT trains this classifier with cyanure (``lambda = 0.00025 / N``, rows L2-normalised after centring) on
MSN's fixed ImageNet split files. This module uses scikit-learn with ``StandardScaler`` and ``C`` instead, and its
own seeded splits, so its numbers are comparable between encoders evaluated here, not to the published ones.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ['lowshot_logistic_regression', 'percent_split', 'shots_per_class_split']


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}.')
    return labels


def _take_per_class(labels: np.ndarray, counts: dict[int, int], seed: int) -> np.ndarray:
    """Return sorted indices: for each class, the first ``counts[class]`` samples of one seeded permutation."""
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    taken_per_class: dict[int, int] = dict.fromkeys(counts, 0)
    chosen = []
    for index in order:
        label = int(labels[index])
        if taken_per_class[label] < counts[label]:
            taken_per_class[label] += 1
            chosen.append(index)
    return np.sort(np.array(chosen, dtype=np.int64))


def shots_per_class_split(labels: np.ndarray | torch.Tensor, shots: int, seed: int) -> np.ndarray:
    """Draw ``shots`` train samples of every class and return their sorted indices.

    Raises:
        ValueError: ``shots`` is not a positive int, or a class has fewer than ``shots`` samples (the message names
            the class and its count).
    """
    labels = _check_labels(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f'shots must be a positive int, got {shots!r}.')
    classes, class_counts = np.unique(labels, return_counts=True)
    short = [(int(c), int(n)) for c, n in zip(classes, class_counts, strict=True) if n < shots]
    if short:
        raise ValueError(
            f'{shots} images per class requested, but {len(short)} classes have fewer train samples '
            f'(class, count): {short[:10]}.'
        )
    return _take_per_class(labels, {int(c): shots for c in classes}, seed)


def percent_split(labels: np.ndarray | torch.Tensor, percent: float, seed: int) -> np.ndarray:
    """Draw ``ceil(percent / 100 * count)`` samples of every class (at least 1) and return their sorted indices.

    Raises:
        ValueError: ``percent`` not in ``(0, 100]``.
    """
    labels = _check_labels(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if not 0 < percent <= 100:
        raise ValueError(f'percent must be in (0, 100], got {percent!r}.')
    classes, class_counts = np.unique(labels, return_counts=True)
    counts = {int(c): max(1, math.ceil(percent / 100 * int(n))) for c, n in zip(classes, class_counts, strict=True)}
    return _take_per_class(labels, counts, seed)


def _fit_and_score(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    regularization: float,
    max_iter: int,
) -> tuple[float, bool]:
    """Return (test accuracy, converged) of a standardised multinomial logistic regression."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features)
    classifier = LogisticRegression(C=regularization, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ConvergenceWarning)
        classifier.fit(scaler.transform(train_features), train_labels)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    predictions = classifier.predict(scaler.transform(test_features))
    return float((predictions == test_labels).mean()), converged


def lowshot_logistic_regression(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    shots: Sequence[int] = (1, 2, 5),
    percents: Sequence[float] = (1.0,),
    num_splits: int = 3,
    seed: int = 0,
    regularization: float = 1.0,
    max_iter: int = 1000,
) -> dict:
    """Measure the test accuracy of logistic regression trained on few labelled samples per class.

    Split ``s`` of a setting uses seed ``seed + s``, so the 1-, 2- and 5-shot splits with the same ``s`` come from
    one permutation and are nested. Settings that a class cannot fill (fewer train samples than ``shots``) are
    skipped with a warning and listed under ``'skipped'``.

    Args:
        train_features, train_labels: ``[N, D]`` float features and ``[N]`` integer labels (any values).
        test_features, test_labels: ``[M, D]`` and ``[M]``. Test labels absent from a split's classes count as wrong.
        shots: images per class of the shot settings.
        percents: percentages of each class of the percentage settings.
        num_splits: seeded splits per setting.
        seed: seed of the first split.
        regularization: ``C`` of ``LogisticRegression``, the inverse L2 strength.
        max_iter: L-BFGS iterations. A fit that does not converge is kept and flagged in ``'converged'``.

    Returns:
        ``{'{n}_per_class': {...}, '{p}_percent': {...}, 'skipped': {...}, 'settings': {...}}``, where each setting
        has ``mean``, ``std`` (population, over splits), ``accuracies``, ``seeds``, ``train_sizes`` and
        ``converged`` per split.

    Raises:
        ValueError: invalid shapes or a ``num_splits`` below 1.
    """
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f'num_splits must be a positive int, got {num_splits!r}.')
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f'train_features and test_features must be [N, D] and [M, D], got {tuple(train_features.shape)} and '
            f'{tuple(test_features.shape)}.'
        )
    x_train = train_features.double().cpu().numpy()
    y_train = _check_labels(train_labels.cpu().numpy())
    x_test = test_features.double().cpu().numpy()
    y_test = _check_labels(test_labels.cpu().numpy())
    if y_train.shape[0] != x_train.shape[0] or y_test.shape[0] != x_test.shape[0]:
        raise ValueError('Every feature row needs one label: the label and feature counts differ.')

    settings: list[tuple[str, Callable[[int], np.ndarray]]] = [
        (f'{n}_per_class', lambda split_seed, n=n: shots_per_class_split(y_train, n, split_seed)) for n in shots
    ]
    settings += [(f'{p:g}_percent', lambda split_seed, p=p: percent_split(y_train, p, split_seed)) for p in percents]

    results: dict = {}
    skipped: dict[str, str] = {}
    for name, draw in settings:
        accuracies, train_sizes, converged = [], [], []
        try:
            splits = [draw(seed + split) for split in range(num_splits)]
        except ValueError as error:
            warnings.warn(f'Skipping low-shot setting {name}: {error}', stacklevel=2)
            skipped[name] = str(error)
            continue
        for indices in splits:
            if np.unique(y_train[indices]).shape[0] < 2:
                raise ValueError('Logistic regression needs at least 2 classes in the train labels.')
            accuracy, fit_converged = _fit_and_score(
                x_train[indices], y_train[indices], x_test, y_test, regularization, max_iter
            )
            accuracies.append(accuracy)
            train_sizes.append(int(indices.shape[0]))
            converged.append(fit_converged)
        results[name] = {
            'mean': float(np.mean(accuracies)),
            'std': float(np.std(accuracies)),
            'accuracies': accuracies,
            'seeds': [seed + split for split in range(num_splits)],
            'train_sizes': train_sizes,
            'converged': converged,
        }

    results['skipped'] = skipped
    results['settings'] = {
        'shots': list(shots),
        'percents': list(percents),
        'num_splits': num_splits,
        'seed': seed,
        'classifier': 'sklearn LogisticRegression (multinomial, lbfgs, L2)',
        'regularization_C': regularization,
        'max_iter': max_iter,
        'preprocessing': 'StandardScaler fitted on each split',
    }
    return results
