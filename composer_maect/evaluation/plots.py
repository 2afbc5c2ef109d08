"""PNG figures of an evaluation: a 2-D t-SNE of features coloured by class, and a confusion matrix.

Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, so they never open a window and never change
the global pyplot backend of the calling program.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ['plot_confusion_matrix', 'plot_tsne']


def _save(figure, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches='tight')
    return path


def plot_tsne(
    features: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    *,
    title: str = 't-SNE of test features',
    max_samples: int = 2000,
    perplexity: float = 30.0,
    seed: int = 0,
) -> dict:
    """Embed features in 2-D with scikit-learn's t-SNE and save a scatter plot coloured by label.

    At most ``max_samples`` samples are embedded (a seeded random subset), because t-SNE takes minutes on a CPU for
    tens of thousands of points. The perplexity is lowered to ``(n - 1) / 3`` when there are too few samples for it.

    Returns:
        ``{'path', 'num_samples', 'perplexity', 'seed'}``.

    Raises:
        ValueError: fewer than 4 samples, or mismatched shapes.
    """
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE

    if features.ndim != 2 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f'features must be [N, D] and labels [N], got shapes {tuple(features.shape)} and {tuple(labels.shape)}.'
        )
    if features.shape[0] < 4:
        raise ValueError(f't-SNE needs at least 4 samples, got {features.shape[0]}.')
    rng = np.random.default_rng(seed)
    rows = np.arange(features.shape[0])
    if rows.shape[0] > max_samples:
        rows = np.sort(rng.choice(rows, size=max_samples, replace=False))
    points = features[torch.from_numpy(rows)].double().cpu().numpy()
    classes = labels[torch.from_numpy(rows)].cpu().numpy()
    perplexity = min(perplexity, (points.shape[0] - 1) / 3)
    embedding = TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(points)

    figure = Figure(figsize=(6.5, 6))
    axes = figure.add_subplot()
    values = np.unique(classes)
    colours = _class_colours(len(values))
    for colour, value in zip(colours, values, strict=True):
        chosen = classes == value
        axes.scatter(embedding[chosen, 0], embedding[chosen, 1], s=6, color=colour, label=str(value), alpha=0.8)
    if len(values) <= 20:
        axes.legend(title='class', markerscale=3, fontsize='small', loc='best')
    axes.set_title(f'{title} ({points.shape[0]} samples)')
    axes.set_xticks([])
    axes.set_yticks([])
    _save(figure, path)
    return {'path': str(path), 'num_samples': int(points.shape[0]), 'perplexity': float(perplexity), 'seed': seed}


def _class_colours(count: int) -> list:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps['tab10'](index) for index in range(count)]
    if count <= 20:
        return [colormaps['tab20'](index) for index in range(count)]
    return [colormaps['turbo'](index / (count - 1)) for index in range(count)]


def plot_confusion_matrix(
    labels: torch.Tensor | np.ndarray,
    predictions: torch.Tensor | np.ndarray,
    path: str | Path,
    *,
    title: str = 'Confusion matrix',
    class_names: Sequence[str] | None = None,
) -> dict:
    """Save the confusion matrix of ``predictions`` against ``labels`` (rows: true class, columns: predicted class).

    The classes are the sorted union of both inputs' values. Cells show counts and are shaded by the fraction of
    their row. Counts are written into the cells for up to 20 classes.

    Returns:
        ``{'path', 'classes', 'matrix'}`` with the matrix as nested lists of counts.
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import confusion_matrix

    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    predictions = predictions.cpu().numpy() if isinstance(predictions, torch.Tensor) else np.asarray(predictions)
    if labels.shape != predictions.shape or labels.ndim != 1 or labels.shape[0] == 0:
        raise ValueError(
            f'labels and predictions must be non-empty 1-D arrays of one length, got {labels.shape} and '
            f'{predictions.shape}.'
        )
    classes = np.union1d(labels, predictions)
    matrix = confusion_matrix(labels, predictions, labels=classes)
    names = [str(value) for value in classes] if class_names is None else list(class_names)
    if len(names) != len(classes):
        raise ValueError(f'class_names has {len(names)} names for {len(classes)} classes.')

    row_sums = matrix.sum(axis=1, keepdims=True)
    fractions = matrix / np.maximum(row_sums, 1)
    size = max(4.5, 0.45 * len(classes) + 2)
    figure = Figure(figsize=(size + 1, size))
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap='Blues', vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label='fraction of the true class')
    if len(classes) <= 20:
        for row in range(len(classes)):
            for column in range(len(classes)):
                colour = 'white' if fractions[row, column] > 0.5 else 'black'
                axes.text(column, row, str(matrix[row, column]), ha='center', va='center', fontsize=7, color=colour)
        axes.set_xticks(range(len(classes)), names)
        axes.set_yticks(range(len(classes)), names)
    axes.set_xlabel('predicted class')
    axes.set_ylabel('true class')
    accuracy = float(np.trace(matrix) / matrix.sum())
    axes.set_title(f'{title} (accuracy {100 * accuracy:.1f}%)')
    _save(figure, path)
    return {'path': str(path), 'classes': [int(value) for value in classes], 'matrix': matrix.tolist()}
