"""Tests for the evaluation protocols: linear probes, k-means clustering, low-shot logistic regression and plots.

Each protocol is compared with a slow, obviously correct reference on small random data: a brute-force search over
cluster-to-class permutations, a plain torch training loop with ``torch.optim.SGD``, and scikit-learn pipelines
built directly on the drawn splits.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from composer_maect.evaluate import evaluate_encoder, run_protocols
from composer_maect.evaluation import (
    cluster_accuracy,
    kmeans_clustering,
    knn_accuracy,
    lowshot_logistic_regression,
    percent_split,
    plot_confusion_matrix,
    plot_tsne,
    shots_per_class_split,
    train_linear_probes,
)
from composer_maect.evaluation.linear_probe import cosine_warmup_factor
from composer_maect.models.vit import create_encoder

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _blobs(num_classes: int, per_class: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around unit centres: features ``[num_classes * per_class, dim]`` and labels.

    The centres depend only on ``num_classes`` and ``dim``, so a train and a test set drawn with different seeds come
    from the same distribution.
    """
    centre_generator = torch.Generator().manual_seed(1000 * num_classes + dim)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=centre_generator), dim=1)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=generator)
    order = torch.randperm(labels.shape[0], generator=generator)
    return features[order], labels[order]


def _relabel(labels: torch.Tensor, mapping: dict[int, int]) -> torch.Tensor:
    return torch.tensor([mapping[int(value)] for value in labels], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------------
# Clustering


def _brute_force_accuracy(labels: list[int], clusters: list[int]) -> float:
    classes = sorted(set(labels))
    cluster_ids = sorted(set(clusters))
    assert len(classes) == len(cluster_ids)
    best = 0
    for permutation in itertools.permutations(classes):
        mapping = dict(zip(cluster_ids, permutation, strict=True))
        best = max(best, sum(mapping[c] == y for c, y in zip(clusters, labels, strict=True)))
    return best / len(labels)


def test_cluster_accuracy_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        labels = rng.integers(0, 4, size=60)
        # Clusters that agree with a hidden permutation of the labels 60% of the time.
        hidden = rng.permutation(4)
        clusters = np.where(rng.random(60) < 0.6, hidden[labels], rng.integers(0, 4, size=60))
        if len(set(clusters)) < 4 or len(set(labels)) < 4:
            continue
        expected = _brute_force_accuracy(labels.tolist(), clusters.tolist())
        assert cluster_accuracy(labels, clusters) == pytest.approx(expected), f'trial {trial}'


def test_cluster_accuracy_any_label_values():
    labels = np.array([-7, -7, 3, 3, 100, 100, 5, 5])
    clusters = np.array([40, 40, 10, 20, 30, 30, 20, 20])
    expected = _brute_force_accuracy(labels.tolist(), clusters.tolist())
    assert cluster_accuracy(labels, clusters) == pytest.approx(expected)
    assert cluster_accuracy(torch.from_numpy(labels), torch.from_numpy(clusters)) == pytest.approx(expected)


def test_cluster_accuracy_more_clusters_than_classes():
    # Clusters 2 and 3 have no class left to map to, so their samples count as wrong.
    assert cluster_accuracy([0, 0, 1, 1], [0, 2, 1, 3]) == pytest.approx(0.5)


def test_cluster_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match='same length'):
        cluster_accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match='empty'):
        cluster_accuracy([], [])


def test_kmeans_separated_blobs_perfect():
    features, labels = _blobs(4, 30, 16, spread=0.05, seed=1)
    result = kmeans_clustering(features, labels, seeds=(0, 1, 2))
    assert [run['seed'] for run in result['per_seed']] == [0, 1, 2]
    assert result['settings']['num_clusters'] == 4
    for metric in ('accuracy', 'nmi', 'ari'):
        assert result['best'][metric] == pytest.approx(1.0)
        assert 0.0 <= result['mean'][metric] <= result['best'][metric]


def test_kmeans_uses_l2_normalised_features():
    features, labels = _blobs(3, 20, 8, spread=0.3, seed=2)
    scales = torch.rand(features.shape[0], 1, generator=torch.Generator().manual_seed(0)) * 10 + 0.1
    plain = kmeans_clustering(features, labels, seeds=(0, 1))
    scaled = kmeans_clustering(features * scales, labels, seeds=(0, 1))
    for plain_run, scaled_run in zip(plain['per_seed'], scaled['per_seed'], strict=True):
        for metric in ('accuracy', 'nmi', 'ari', 'inertia'):
            assert scaled_run[metric] == pytest.approx(plain_run[metric]), metric


def test_kmeans_rejects_bad_input():
    features, labels = _blobs(3, 5, 4, spread=0.1, seed=0)
    with pytest.raises(ValueError, match='num_clusters'):
        kmeans_clustering(features, labels, num_clusters=100)
    with pytest.raises(ValueError, match='seeds'):
        kmeans_clustering(features, labels, seeds=())
    features[0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        kmeans_clustering(features, labels)


# ---------------------------------------------------------------------------------------------------------------------
# Linear probe


def _reference_probe(train_x, train_y, test_x, test_y, *, lr, epochs, momentum=0.9, warmup_fraction=0.1):
    """One probe trained with nn.BatchNorm1d, nn.Linear, torch.optim.SGD and LambdaLR on full batches, zero init."""
    classes = torch.unique(train_y)
    num_classes = classes.shape[0]
    train_slots = torch.searchsorted(classes, train_y)
    test_slots = torch.searchsorted(classes, test_y)
    model = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], num_classes))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=0.0)
    total = epochs
    warmup = round(warmup_fraction * total)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    accuracies = []
    for _ in range(epochs):
        model.train()
        loss = nn.functional.cross_entropy(model(train_x), train_slots)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        model.eval()
        with torch.no_grad():
            predictions = model(test_x).argmax(dim=1)
        accuracies.append((predictions == test_slots).double().mean().item())
    return accuracies


def test_linear_probe_matches_torch_loop():
    # Overlapping blobs, so that the accuracy keeps changing over the epochs.
    train_x, train_y = _blobs(5, 40, 12, spread=0.6, seed=3)
    test_x, test_y = _blobs(5, 40, 12, spread=0.6, seed=4)
    train_y, test_y = train_y * 3 + 1, test_y * 3 + 1  # discontiguous labels 1, 4, 7, 10, 13
    result = train_linear_probes(
        train_x, train_y, test_x, test_y, lrs=[0.3], epochs=20, batch_size=1000, val_fraction=0.0, init_std=0.0
    )
    expected = _reference_probe(train_x, train_y, test_x, test_y, lr=0.3, epochs=20)
    assert [row[0] for row in result.test_accuracy] == pytest.approx(expected)
    assert result.val_selected is None
    assert result.test_selected['test_accuracy'] == pytest.approx(max(expected))


def test_linear_probe_grid_equals_single_runs():
    train_x, train_y = _blobs(4, 50, 10, spread=0.7, seed=5)
    test_x, test_y = _blobs(4, 25, 10, spread=0.7, seed=6)
    common = {'epochs': 6, 'batch_size': 32, 'val_fraction': 0.2, 'init_std': 0.0, 'seed': 3}
    grid = train_linear_probes(train_x, train_y, test_x, test_y, lrs=[0.5, 0.05, 0.005], **common)
    for probe, lr in enumerate([0.5, 0.05, 0.005]):
        single = train_linear_probes(train_x, train_y, test_x, test_y, lrs=[lr], **common)
        assert [row[probe] for row in grid.test_accuracy] == pytest.approx([row[0] for row in single.test_accuracy])
        assert [row[probe] for row in grid.val_accuracy] == pytest.approx([row[0] for row in single.val_accuracy])


def test_linear_probe_selection_and_seeding():
    train_x, train_y = _blobs(3, 60, 8, spread=0.25, seed=7)
    test_x, test_y = _blobs(3, 30, 8, spread=0.25, seed=8)
    first = train_linear_probes(train_x, train_y, test_x, test_y, lrs=[0.4, 0.04], epochs=8, batch_size=16, seed=1)
    second = train_linear_probes(train_x, train_y, test_x, test_y, lrs=[0.4, 0.04], epochs=8, batch_size=16, seed=1)
    assert first.to_dict() == second.to_dict()
    assert first.settings['num_val_samples'] == 18
    assert first.settings['num_fit_samples'] == 162
    assert first.test_selected['test_accuracy'] >= first.val_selected['test_accuracy']
    assert first.test_selected['test_accuracy'] == max(max(row) for row in first.test_accuracy)
    assert first.val_selected['selection_accuracy'] == max(max(row) for row in first.val_accuracy)
    assert first.test_selected['test_accuracy'] > 0.9


def test_cosine_warmup_factor_shape():
    factors = [cosine_warmup_factor(step, 20, 4) for step in range(20)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert factors[-1] > 0


def test_linear_probe_rejects_bad_input():
    train_x, train_y = _blobs(2, 5, 4, spread=0.1, seed=0)
    with pytest.raises(ValueError, match='lrs'):
        train_linear_probes(train_x, train_y, train_x, train_y, lrs=[])
    with pytest.raises(ValueError, match='epochs'):
        train_linear_probes(train_x, train_y, train_x, train_y, epochs=0)
    with pytest.raises(ValueError, match='at least 3 train samples'):
        train_linear_probes(train_x[:2], train_y[:2], train_x, train_y)
    with pytest.raises(ValueError, match='dimension'):
        train_linear_probes(train_x, train_y, train_x[:, :2], train_y)


# ---------------------------------------------------------------------------------------------------------------------
# Low-shot


def test_shots_split_exact_counts_and_reproducible():
    labels = torch.tensor([5] * 10 + [-2] * 7 + [40] * 12)
    for shots in (1, 2, 5):
        split = shots_per_class_split(labels, shots, seed=0)
        values, counts = np.unique(labels.numpy()[split], return_counts=True)
        assert values.tolist() == [-2, 5, 40]
        assert counts.tolist() == [shots] * 3
        assert np.array_equal(split, shots_per_class_split(labels, shots, seed=0))
        assert len(set(split.tolist())) == split.shape[0]
    draws = {tuple(shots_per_class_split(labels, 2, seed=seed)) for seed in range(5)}
    assert len(draws) > 1


def test_shots_splits_nested_across_shot_counts():
    labels = np.repeat(np.arange(4), 9)
    one = set(shots_per_class_split(labels, 1, seed=3).tolist())
    five = set(shots_per_class_split(labels, 5, seed=3).tolist())
    assert one <= five


def test_percent_split_counts():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    split = percent_split(labels, 10.0, seed=0)
    counts = np.bincount(labels[split])
    assert counts.tolist() == [5, 3, 1]


def test_shots_split_too_few_samples():
    labels = np.array([0, 0, 0, 1])
    with pytest.raises(ValueError, match=r'\(1, 1\)'):
        shots_per_class_split(labels, 2, seed=0)


def test_lowshot_matches_sklearn_pipeline():
    train_x, train_y = _blobs(4, 20, 6, spread=0.8, seed=9)
    test_x, test_y = _blobs(4, 20, 6, spread=0.8, seed=10)
    result = lowshot_logistic_regression(train_x, train_y, test_x, test_y, shots=(2,), percents=(25.0,), num_splits=3)
    expected = []
    for seed in range(3):
        split = shots_per_class_split(train_y, 2, seed)
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        pipeline.fit(train_x.double().numpy()[split], train_y.numpy()[split])
        expected.append(float((pipeline.predict(test_x.double().numpy()) == test_y.numpy()).mean()))
    entry = result['2_per_class']
    assert entry['accuracies'] == pytest.approx(expected)
    assert entry['mean'] == pytest.approx(np.mean(expected))
    assert entry['std'] == pytest.approx(np.std(expected))
    assert entry['train_sizes'] == [8, 8, 8]
    assert result['25_percent']['train_sizes'] == [20, 20, 20]


def test_lowshot_skips_unfillable_setting():
    train_x, train_y = _blobs(3, 3, 4, spread=0.2, seed=0)
    with pytest.warns(UserWarning, match='5_per_class'):
        result = lowshot_logistic_regression(train_x, train_y, train_x, train_y, shots=(1, 5), percents=())
    assert '1_per_class' in result
    assert '5_per_class' in result['skipped']


# ---------------------------------------------------------------------------------------------------------------------
# Properties across protocols


def _all_accuracies(train, test) -> dict[str, float]:
    knn = knn_accuracy(*train, *test, ks=(5,), standardize=True)
    probe = train_linear_probes(*train, *test, lrs=[0.2, 0.02], epochs=5, batch_size=32, init_std=0.0)
    clustering = kmeans_clustering(*test, seeds=(0, 1))
    lowshot = lowshot_logistic_regression(*train, *test, shots=(1, 3), percents=(10.0,), num_splits=2)
    return {
        'knn': knn['top1@5'],
        'probe_val': probe.val_selected['test_accuracy'],
        'probe_test': probe.test_selected['test_accuracy'],
        'kmeans_acc': clustering['mean']['accuracy'],
        'kmeans_nmi': clustering['mean']['nmi'],
        'kmeans_ari': clustering['mean']['ari'],
        'lowshot_1': lowshot['1_per_class']['mean'],
        'lowshot_3': lowshot['3_per_class']['mean'],
        'lowshot_10pct': lowshot['10_percent']['mean'],
    }


def test_relabelling_changes_no_accuracy():
    train = _blobs(5, 30, 10, spread=0.7, seed=11)
    test = _blobs(5, 20, 10, spread=0.7, seed=12)
    # A permutation of the classes onto discontiguous, negative and unsorted values.
    mapping = {0: 42, 1: -3, 2: 7, 3: 1000, 4: 0}
    original = _all_accuracies(train, test)
    relabelled = _all_accuracies((train[0], _relabel(train[1], mapping)), (test[0], _relabel(test[1], mapping)))
    for name, value in original.items():
        assert relabelled[name] == pytest.approx(value, abs=1e-12), name


def test_discontiguous_labels_match_contiguous():
    train = _blobs(3, 30, 6, spread=0.5, seed=13)
    test = _blobs(3, 20, 6, spread=0.5, seed=14)
    mapping = {0: 2, 1: 9, 2: 31}  # same order, gaps between the values
    assert _all_accuracies(train, test) == pytest.approx(
        _all_accuracies((train[0], _relabel(train[1], mapping)), (test[0], _relabel(test[1], mapping)))
    )


# ---------------------------------------------------------------------------------------------------------------------
# Plots and the features-to-results pipeline


def test_plots_are_pngs(tmp_path):
    features, labels = _blobs(3, 15, 5, spread=0.2, seed=15)
    labels = labels * 10 - 5
    tsne = plot_tsne(features, labels, tmp_path / 'tsne.png', max_samples=30)
    assert tsne['num_samples'] == 30
    assert (tmp_path / 'tsne.png').read_bytes()[:8] == PNG_MAGIC

    predictions = labels.clone()
    predictions[:4] = 99  # a value that no true label has
    confusion = plot_confusion_matrix(labels, predictions, tmp_path / 'confusion.png')
    assert (tmp_path / 'confusion.png').read_bytes()[:8] == PNG_MAGIC
    assert confusion['classes'] == [-5, 5, 15, 99]
    matrix = np.array(confusion['matrix'])
    for row, true_value in enumerate(confusion['classes']):
        for column, predicted_value in enumerate(confusion['classes']):
            expected = int(((labels == true_value) & (predictions == predicted_value)).sum())
            assert matrix[row, column] == expected


def test_tsne_small_set_lowers_perplexity(tmp_path):
    features, labels = _blobs(2, 5, 4, spread=0.2, seed=0)
    result = plot_tsne(features, labels, tmp_path / 'small.png')
    assert result['perplexity'] == pytest.approx(3.0)


def test_run_protocols_rejects_unknown_protocol():
    train = _blobs(2, 5, 4, spread=0.1, seed=0)
    with pytest.raises(ValueError, match='Unknown protocols'):
        run_protocols(train, train, protocols=['knn', 'svm'])


def test_evaluation_leaves_model_unchanged(tmp_path):
    torch.manual_seed(0)
    vit = create_encoder('vit_tiny_patch16', img_size=16, patch_size=4, depth=1)
    vit.train()
    vit.blocks[0].norm1.eval()  # a submodule whose own flag must survive
    before = {name: tensor.clone() for name, tensor in vit.state_dict().items()}
    modes = {name: module.training for name, module in vit.named_modules()}
    generator = torch.Generator().manual_seed(0)

    def batches(count: int, offset: int):
        images = torch.randn(count, 3, 16, 16, generator=generator)
        labels = torch.arange(count) % 3 * 4 + 1
        return [
            {
                'image': images[i : i + 8],
                'label': labels[i : i + 8],
                'index': torch.arange(i, min(i + 8, count)) + offset,
            }
            for i in range(0, count, 8)
        ]

    options = {
        'ks': [3],
        'probe_epochs': 2,
        'probe_batch_size': 16,
        'clustering_seeds': [0],
        'lowshot_shots': [1],
        'lowshot_percents': [],
        'lowshot_splits': 1,
    }
    results = evaluate_encoder(vit, batches(30, 0), batches(18, 100), options=options, plots_dir=tmp_path)
    after = vit.state_dict()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert {name: module.training for name, module in vit.named_modules()} == modes
    assert set(results) >= {'knn', 'linear_probe', 'clustering', 'lowshot', 'plots', 'seconds'}
    assert (tmp_path / 'tsne.png').is_file()
    assert (tmp_path / 'knn_confusion.png').is_file()
