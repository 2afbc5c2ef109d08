"""Tests for token pooling, feature extraction, weighted k-NN classification and the KNNMonitor callback.

The k-NN functions are compared with a slow reference written with Python loops. The callback runs inside a real
Composer Trainer on MDS shards of scikit-learn's digits (1,797 8x8 images), encoded by a two-block ViT.
"""

import copy
import json
import logging
import math
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.algorithms import EMA
from composer.core import Callback
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from torch import nn

from composer_maect.callbacks.knn_monitor import KNNMonitor, find_vision_transformer
from composer_maect.data.convert import convert
from composer_maect.data.dataset import build_image_dataloader
from composer_maect.data.transforms import build_transform
from composer_maect.evaluation import MIN_TEMPERATURE, extract_features, knn_accuracy, knn_predict
from composer_maect.models.pooling import POOLINGS, encode_pooled, pool_tokens
from composer_maect.models.vit import create_encoder

from .gloo import spawn_ranks

IMG = 16
PATCH = 4
NUM_DIGIT_CLASSES = 10
RUN_NAME = 'knn-test'


# ---------------------------------------------------------------------------------------------------------------------
# Slow reference: Python loops over the queries, an explicit sort and an explicit vote dict.


def _standardize_rows(train_rows, test_rows):
    dim = len(train_rows[0])
    count = len(train_rows)
    means = [sum(row[d] for row in train_rows) / count for d in range(dim)]
    stds = [math.sqrt(sum((row[d] - means[d]) ** 2 for row in train_rows) / count) for d in range(dim)]
    stds = [std if std > 1e-6 else 1.0 for std in stds]

    def standardize(rows):
        return [[(row[d] - means[d]) / stds[d] for d in range(dim)] for row in rows]

    return standardize(train_rows), standardize(test_rows)


def _unit(row):
    norm = math.sqrt(sum(value * value for value in row))
    return [value / norm for value in row]


def reference_neighbours(train_features, train_labels, test_features, k, temperature, standardize):
    """Return, per query, the vote dict {label: summed weight} and the labels of its k nearest neighbours."""
    train_rows = train_features.double().tolist()
    test_rows = test_features.double().tolist()
    if standardize:
        train_rows, test_rows = _standardize_rows(train_rows, test_rows)
    train_rows = [_unit(row) for row in train_rows]
    test_rows = [_unit(row) for row in test_rows]
    labels = train_labels.tolist()
    k = min(k, len(train_rows))

    results = []
    for query in test_rows:
        similarities = []
        for index, row in enumerate(train_rows):
            similarities.append((sum(a * b for a, b in zip(query, row, strict=True)), index))
        nearest = sorted(similarities, key=lambda pair: pair[0], reverse=True)[:k]
        votes = {}
        for similarity, index in nearest:
            votes[labels[index]] = votes.get(labels[index], 0.0) + math.exp(similarity / temperature)
        results.append((votes, [labels[index] for _, index in nearest]))
    return results


def reference_accuracy(train_features, train_labels, test_features, test_labels, ks, topk, temperature, standardize):
    num_classes = len(set(train_labels.tolist()))
    expected = {}
    for k in ks:
        neighbours = reference_neighbours(train_features, train_labels, test_features, k, temperature, standardize)
        for t in topk:
            correct = 0
            for (votes, _), label in zip(neighbours, test_labels.tolist(), strict=True):
                ranked = sorted(votes, key=lambda c: votes[c], reverse=True)
                if label in ranked[: min(t, num_classes)]:
                    correct += 1
            expected[f'top{t}@{k}'] = correct / len(neighbours)
        purity = 0.0
        for (_, neighbour_labels), label in zip(neighbours, test_labels.tolist(), strict=True):
            purity += sum(1 for other in neighbour_labels if other == label) / len(neighbour_labels)
        expected[f'purity@{k}'] = purity / len(neighbours)
    return expected


def clustered_data(num_train=60, num_test=23, dim=12, num_classes=5, seed=0):
    """Gaussian features around one random centre per class, so that k-NN is better than chance but not perfect."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)
    train_labels = torch.randint(0, num_classes, (num_train,), generator=generator)
    test_labels = torch.randint(0, num_classes, (num_test,), generator=generator)
    # Different scales per dimension make standardisation change the neighbours.
    scales = torch.linspace(0.2, 3.0, dim)
    train = (centres[train_labels] + 1.5 * torch.randn(num_train, dim, generator=generator)) * scales
    test = (centres[test_labels] + 1.5 * torch.randn(num_test, dim, generator=generator)) * scales
    return train, train_labels, test, test_labels


# ---------------------------------------------------------------------------------------------------------------------
# knn_predict and knn_accuracy against the reference


@pytest.mark.parametrize('standardize', [False, True])
@pytest.mark.parametrize('k', [1, 4, 10])
@pytest.mark.parametrize('chunk_size', [7, 1024])
def test_knn_predict_matches_reference(standardize, k, chunk_size):
    train, train_labels, test, _ = clustered_data()

    scores = knn_predict(
        train, train_labels, test, k=k, temperature=0.07, standardize=standardize, chunk_size=chunk_size
    )

    reference = reference_neighbours(train, train_labels, test, k, 0.07, standardize)
    classes = sorted(set(train_labels.tolist()))
    expected = torch.tensor([[votes.get(c, 0.0) for c in classes] for votes, _ in reference], dtype=torch.float32)
    assert scores.dtype == torch.float32
    assert scores.shape == (test.shape[0], len(classes))
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize('standardize', [False, True])
def test_knn_accuracy_matches_reference(standardize):
    train, train_labels, test, test_labels = clustered_data(num_classes=4)
    ks = (1, 3, 10, 20)
    topk = (1, 2, 5)  # 5 is clipped to the 4 classes

    results = knn_accuracy(
        train, train_labels, test, test_labels, ks=ks, topk=topk, temperature=0.1, standardize=standardize, chunk_size=5
    )

    expected = reference_accuracy(train, train_labels, test, test_labels, ks, topk, 0.1, standardize)
    assert results.keys() == expected.keys()
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, abs=1e-6), name
    assert 0.0 < results['top1@10'] < 1.0, 'the data should make k-NN imperfect, or the comparison proves little'


def test_knn_standardize_changes_neighbours():
    train, train_labels, test, _ = clustered_data()

    plain = knn_predict(train, train_labels, test, k=10)
    standardized = knn_predict(train, train_labels, test, k=10, standardize=True)

    assert not torch.allclose(plain, standardized)


def test_knn_chunk_size_invariance():
    train, train_labels, test, _ = clustered_data(num_test=40)

    whole = knn_predict(train, train_labels, test, k=5, chunk_size=1024)
    for chunk_size in (1, 3, 39):
        torch.testing.assert_close(knn_predict(train, train_labels, test, k=5, chunk_size=chunk_size), whole)


def test_knn_top5_few_classes():
    # Three classes and k=1: only one class gets a vote, so top-5 (clipped to 3) equals top-1.
    train, train_labels, test, test_labels = clustered_data(num_classes=3)

    results = knn_accuracy(train, train_labels, test, test_labels, ks=(1, 60), topk=(1, 5))

    assert results['top5@1'] == results['top1@1']
    assert results['top5@60'] == 1.0  # all 60 train samples vote, so every class is among the top 3


def test_knn_float32_for_other_dtypes():
    train, train_labels, test, _ = clustered_data()

    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        scores = knn_predict(train.to(dtype), train_labels, test.to(dtype), k=5)
        assert scores.dtype == torch.float32, dtype


# ---------------------------------------------------------------------------------------------------------------------
# Labels


def test_knn_relabelling_keeps_accuracy():
    train, train_labels, test, test_labels = clustered_data()
    kwargs = {'ks': (1, 5, 10), 'topk': (1, 2, 5), 'chunk_size': 8}
    baseline = knn_accuracy(train, train_labels, test, test_labels, **kwargs)

    permutation = torch.tensor([3, 0, 4, 1, 2])
    permuted = knn_accuracy(train, permutation[train_labels], test, permutation[test_labels], **kwargs)
    offset = knn_accuracy(train, train_labels * 7 + 3, test, test_labels * 7 + 3, **kwargs)

    assert permuted == baseline
    assert offset == baseline


def test_knn_predict_column_order():
    train, train_labels, test, _ = clustered_data()
    permutation = torch.tensor([3, 0, 4, 1, 2])

    baseline = knn_predict(train, train_labels, test, k=10)
    permuted = knn_predict(train, permutation[train_labels], test, k=10)

    # Column j of the permuted scores belongs to label j, which was label argsort(permutation)[j] before.
    torch.testing.assert_close(permuted, baseline[:, torch.argsort(permutation)])


def test_knn_discontiguous_labels():
    train, train_labels, test, test_labels = clustered_data(num_classes=3)
    label_values = torch.tensor([-4, 2, 100])

    scores = knn_predict(train, label_values[train_labels], test, k=10)
    results = knn_accuracy(train, label_values[train_labels], test, label_values[test_labels], ks=(10,))

    assert scores.shape == (test.shape[0], 3)
    torch.testing.assert_close(scores, knn_predict(train, train_labels, test, k=10))
    assert results == knn_accuracy(train, train_labels, test, test_labels, ks=(10,))


def test_knn_test_classes_subset():
    train, train_labels, test, test_labels = clustered_data(num_classes=5)
    subset = test_labels < 2
    test, test_labels = test[subset], test_labels[subset]

    with warnings.catch_warnings():
        warnings.simplefilter('error')
        results = knn_accuracy(train, train_labels, test, test_labels, ks=(1, 10), topk=(1, 5))

    expected = reference_accuracy(train, train_labels, test, test_labels, (1, 10), (1, 5), 0.07, False)
    assert results == pytest.approx(expected, abs=1e-6)


def test_knn_unknown_test_label():
    train, train_labels, test, test_labels = clustered_data(num_classes=3)
    test_labels = test_labels.clone()
    test_labels[:4] = 9

    with pytest.warns(UserWarning, match='4 of 23 queries have labels that no train sample has'):
        results = knn_accuracy(train, train_labels, test, test_labels, ks=(10,), topk=(1, 5))

    expected = reference_accuracy(train, train_labels, test, test_labels, (10,), (1, 5), 0.07, False)
    assert results == pytest.approx(expected, abs=1e-6)
    assert results['top5@10'] <= 19 / 23


def test_knn_large_k_clipped():
    train, train_labels, test, test_labels = clustered_data(num_train=15)

    with pytest.warns(UserWarning, match='k=40 is larger than the 15 train samples'):
        clipped = knn_predict(train, train_labels, test, k=40)
    with pytest.warns(UserWarning, match='k=40 is larger than the 15 train samples'):
        results = knn_accuracy(train, train_labels, test, test_labels, ks=(5, 40))

    torch.testing.assert_close(clipped, knn_predict(train, train_labels, test, k=15))
    exact = knn_accuracy(train, train_labels, test, test_labels, ks=(15,))
    assert results['top1@40'] == exact['top1@15']
    assert results['purity@40'] == exact['purity@15']


@pytest.mark.parametrize(
    ('change', 'error', 'match'),
    [
        ({'k': 0}, ValueError, 'k must be a positive int'),
        ({'k': 2.5}, ValueError, 'k must be a positive int'),
        ({'chunk_size': 0}, ValueError, 'chunk_size must be a positive int'),
        ({'temperature': 0.001}, ValueError, 'temperature must be at least'),
        ({'temperature': float('nan')}, ValueError, 'temperature must be a finite number'),
        ({'train_labels': 'float'}, TypeError, 'train_labels must be an integer tensor'),
        ({'train_labels': 'short'}, ValueError, r'train_labels must have shape \[60\]'),
        ({'test_features': 'wide'}, ValueError, 'test_features has dimension 13'),
        ({'test_features': '3d'}, ValueError, r'test_features must have shape \[samples, dim\]'),
        ({'train_features': 'nan'}, ValueError, 'train_features has 1 rows with NaN or infinite values'),
        ({'train_features': 'empty'}, ValueError, 'train_features is empty'),
        ({'train_features': 'ints'}, TypeError, 'train_features must be a floating-point tensor'),
    ],
)
def test_knn_predict_rejects_invalid_input(change, error, match):
    train, train_labels, test, _ = clustered_data()
    arguments = {'train_features': train, 'train_labels': train_labels, 'test_features': test}
    variants = {
        'float': train_labels.float(),
        'short': train_labels[:-1],
        'wide': torch.randn(test.shape[0], 13),
        '3d': test[:, None],
        'nan': train.clone().index_fill_(0, torch.tensor([3]), float('nan')),
        'empty': train[:0],
        'ints': train.round().long(),
    }
    for name, value in change.items():
        arguments[name] = variants.get(value, value) if isinstance(value, str) else value
    if 'train_features' in change and change['train_features'] == 'empty':
        arguments['train_labels'] = train_labels[:0]

    with pytest.raises(error, match=match):
        knn_predict(**arguments)


def test_knn_accuracy_rejects_invalid_input():
    train, train_labels, test, test_labels = clustered_data()

    with pytest.raises(ValueError, match='test_features is empty'):
        knn_accuracy(train, train_labels, test[:0], test_labels[:0])
    with pytest.raises(ValueError, match=r'test_labels must have shape \[23\]'):
        knn_accuracy(train, train_labels, test, test_labels[:5])
    with pytest.raises(ValueError, match='ks must contain at least one value'):
        knn_accuracy(train, train_labels, test, test_labels, ks=())
    with pytest.raises(ValueError, match='every value of topk must be a positive int'):
        knn_accuracy(train, train_labels, test, test_labels, topk=(0, 1))


def test_knn_min_temperature_finite():
    train, train_labels, test, _ = clustered_data()

    scores = knn_predict(train, train_labels, test, k=10, temperature=MIN_TEMPERATURE)

    assert torch.isfinite(scores).all()
    assert (scores.sum(dim=1) > 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# Pooling


def tiny_vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_encoder('vit_tiny_patch16', img_size=IMG, patch_size=PATCH, depth=2, **kwargs)


@pytest.mark.parametrize('num_prefix_tokens', [1, 3])
def test_pool_tokens_matches_manual_indexing(num_prefix_tokens):
    tokens = torch.randn(4, 9, 6)

    cls = pool_tokens(tokens, 'cls', num_prefix_tokens=num_prefix_tokens)
    mean_patch = pool_tokens(tokens, 'mean_patch', num_prefix_tokens=num_prefix_tokens)

    expected_mean = torch.zeros(4, 6)
    for token in range(num_prefix_tokens, 9):
        expected_mean += tokens[:, token]
    expected_mean /= 9 - num_prefix_tokens
    assert torch.equal(cls, tokens[:, 0])
    torch.testing.assert_close(mean_patch, expected_mean)


def test_pool_tokens_rejects_invalid_input():
    tokens = torch.randn(2, 5, 4)

    with pytest.raises(ValueError, match=r"Unknown pooling 'max'. Valid poolings: \['cls', 'mean_patch'\]"):
        pool_tokens(tokens, 'max')
    with pytest.raises(ValueError, match=r'tokens must have shape \[batch, tokens, dim\]'):
        pool_tokens(tokens[0], 'cls')
    with pytest.raises(ValueError, match='needs a CLS token at position 0'):
        pool_tokens(tokens, 'cls', num_prefix_tokens=0)
    with pytest.raises(ValueError, match='has only 5 tokens'):
        pool_tokens(tokens, 'mean_patch', num_prefix_tokens=5)
    with pytest.raises(ValueError, match='num_prefix_tokens must be a non-negative int'):
        pool_tokens(tokens, 'mean_patch', num_prefix_tokens=-1)


@pytest.mark.parametrize('pooling', POOLINGS)
def test_encode_pooled_pools_forward_features(pooling):
    vit = tiny_vit().eval()
    images = torch.randn(3, 3, IMG, IMG)

    with torch.no_grad():
        features = encode_pooled(vit, images, pooling)
        tokens = vit.forward_features(images)

    assert tokens.shape == (3, 1 + (IMG // PATCH) ** 2, vit.embed_dim)
    expected = tokens[:, 0] if pooling == 'cls' else tokens[:, 1:].mean(dim=1)
    torch.testing.assert_close(features, expected)


def test_encode_pooled_rejects_cls_without_class_token():
    vit = create_encoder('vit_tiny_patch16', img_size=IMG, patch_size=PATCH, depth=1)
    vit.has_class_token = False

    with pytest.raises(ValueError, match='class_token=False'):
        encode_pooled(vit, torch.randn(1, 3, IMG, IMG), 'cls')
    with pytest.raises(ValueError, match='Unknown pooling'):
        encode_pooled(vit, torch.randn(1, 3, IMG, IMG), 'gap')


# ---------------------------------------------------------------------------------------------------------------------
# extract_features


class TokenBatchNorm(nn.Module):
    """BatchNorm over the token dimension ``D`` of ``[B, T, D]``: its running statistics change in train mode."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)

    def forward(self, tokens):
        return self.norm(tokens.transpose(1, 2)).transpose(1, 2)


def image_for_index(index):
    generator = torch.Generator().manual_seed(1000 + index)
    return torch.randn(3, IMG, IMG, generator=generator)


def batches_for(indices, batch_size, key='image'):
    """Dict batches of the images of ``indices``, with label ``index % 3``."""
    batches = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        batches.append(
            {
                key: torch.stack([image_for_index(index) for index in chunk]),
                'label': torch.tensor([index % 3 for index in chunk]),
                'index': torch.tensor(chunk),
            }
        )
    return batches


def expected_features(vit, indices, pooling='cls'):
    """Features of ``indices`` in eval mode, computed directly."""
    vit = copy.deepcopy(vit).eval()
    with torch.no_grad():
        return encode_pooled(vit, torch.stack([image_for_index(index) for index in indices]), pooling)


def test_extract_features_leaves_model_unchanged():
    vit = tiny_vit(drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3)
    vit.norm_pre = TokenBatchNorm(vit.embed_dim)
    vit.train()
    vit.blocks[1].eval()  # a frozen part that must stay in eval mode
    flags_before = {name: module.training for name, module in vit.named_modules()}
    state_before = {name: tensor.clone() for name, tensor in vit.state_dict().items()}
    reference = expected_features(vit, list(range(10)))

    features, labels, indices = extract_features(vit, batches_for(list(range(10)), batch_size=4))

    flags_after = {name: module.training for name, module in vit.named_modules()}
    assert flags_after == flags_before
    assert vit.training
    assert not vit.blocks[1].training
    for name, tensor in vit.state_dict().items():
        assert torch.equal(tensor, state_before[name]), f'{name} changed'
    # Eval mode: dropout off and BatchNorm on its running statistics, so the features match a direct eval pass.
    torch.testing.assert_close(features, reference)
    assert features.dtype == torch.float32
    assert labels.tolist() == [index % 3 for index in range(10)]
    assert indices.tolist() == list(range(10))
    assert not features.requires_grad


def test_extract_features_repeated_indices():
    vit = tiny_vit()
    order = [7, 2, 9, 0, 2, 5, 7, 1]

    features, labels, indices = extract_features(
        vit, batches_for(order, batch_size=3, key='view0'), pooling='mean_patch'
    )

    assert indices.tolist() == [0, 1, 2, 5, 7, 9]
    assert labels.tolist() == [index % 3 for index in [0, 1, 2, 5, 7, 9]]
    torch.testing.assert_close(features, expected_features(vit, [0, 1, 2, 5, 7, 9], 'mean_patch'))


def test_extract_features_max_samples():
    vit = tiny_vit()

    features, _, indices = extract_features(vit, batches_for([4, 3, 2, 1, 0], batch_size=2), max_samples=3)

    assert indices.tolist() == [2, 3, 4]
    torch.testing.assert_close(features, expected_features(vit, [2, 3, 4]))


def test_extract_features_empty_dataloader():
    vit = tiny_vit()

    features, labels, indices = extract_features(vit, [])

    assert features.shape == (0, vit.embed_dim)
    assert labels.shape == (0,)
    assert indices.shape == (0,)


def test_extract_features_rejects_invalid_batches():
    vit = tiny_vit()
    batch = batches_for([0, 1], batch_size=2)[0]

    with pytest.raises(TypeError, match='needs dict batches'):
        extract_features(vit, [(batch['image'], batch['label'])])
    with pytest.raises(KeyError, match="needs a batch key 'index'"):
        extract_features(vit, [{'image': batch['image'], 'label': batch['label']}])
    with pytest.raises(KeyError, match="needs a batch key 'image' or 'view0'"):
        extract_features(vit, [{'pixels': batch['image'], 'label': batch['label'], 'index': batch['index']}])
    with pytest.raises(ValueError, match='max_samples must be a positive int or None'):
        extract_features(vit, [batch], max_samples=0)
    with pytest.raises(ValueError, match='Unknown pooling'):
        extract_features(vit, [batch], pooling='token')


# Two gloo ranks with uneven, overlapping shares of the samples: every rank must return the same full set.
WORLD_SIZE = 2
RANK_INDICES = {0: [5, 0, 3, 1], 1: [2, 4, 5, 6, 3, 7]}


def extract_on_rank(process_rank):
    vit = tiny_vit()
    batches = batches_for(RANK_INDICES[process_rank], batch_size=3)
    full = extract_features(vit, batches)
    limited = extract_features(vit, batches, max_samples=5)
    return {'full': full, 'limited': limited}


def test_extract_features_two_ranks(tmp_path):
    results = spawn_ranks(extract_on_rank, tmp_path, WORLD_SIZE)

    reference = expected_features(tiny_vit(), list(range(8)))
    for rank, result in enumerate(results):
        features, labels, indices = result['full']
        assert indices.tolist() == list(range(8)), f'rank {rank}'
        assert labels.tolist() == [index % 3 for index in range(8)], f'rank {rank}'
        torch.testing.assert_close(features, reference, msg=f'rank {rank}')

        # max_samples=5: each rank reads ceil(5 / 2) = 3 samples, [5, 0, 3] and [2, 4, 5], then 5 are kept.
        limited_features, _, limited_indices = result['limited']
        assert limited_indices.tolist() == [0, 2, 3, 4, 5], f'rank {rank}'
        torch.testing.assert_close(limited_features, reference[[0, 2, 3, 4, 5]], msg=f'rank {rank}')


# ---------------------------------------------------------------------------------------------------------------------
# KNNMonitor in a Composer Trainer on digits shards


@pytest.fixture(scope='module')
def digits_source(tmp_path_factory):
    """The digits as MDS shards (1,438 train and 359 val images), converted once for this file."""
    out = tmp_path_factory.mktemp('digits')
    convert('digits', str(out), val_fraction=0.2, seed=0, progress=False)
    return out


@pytest.fixture
def digits(digits_source, tmp_path):
    """A copy of the digits shards for one test, so that every dataset of the test reads its own folder."""
    out = tmp_path / 'digits'
    shutil.copytree(digits_source, out)
    return out


def split_copy(digits, split, name):
    """Copy ``split`` of the digits shards into a folder of its own and return its path."""
    folder = digits.parent / name
    shutil.copytree(digits / split, folder)
    return str(folder)


class DigitClassifier(ComposerModel):
    """A two-block ViT with a linear head, trained with cross-entropy on dict batches."""

    def __init__(self):
        super().__init__()
        self.encoder = tiny_vit()
        self.head = nn.Linear(self.encoder.embed_dim, NUM_DIGIT_CLASSES)

    def forward(self, batch):
        return self.head(self.encoder(batch['image']))

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch['label'])


class WeightSnapshots(Callback):
    """Copy the model's parameters and buffers at every BATCH_END and FIT_END."""

    def __init__(self):
        self.snapshots = []

    def _snapshot(self, state):
        self.snapshots.append({name: tensor.detach().clone() for name, tensor in state.model.state_dict().items()})

    def batch_end(self, state, logger):
        self._snapshot(state)

    def fit_end(self, state, logger):
        self._snapshot(state)


def make_trainer(digits, callbacks, algorithms=(), max_duration='2ba', loggers=()):
    model = DigitClassifier()
    train_dataloader = build_image_dataloader(
        local=split_copy(digits, 'train', 'fit_train'),
        batch_size=32,
        transform=build_transform('eval', img_size=IMG),
        shuffle=True,
    )
    return Trainer(
        model=model,
        train_dataloader=train_dataloader,
        optimizers=torch.optim.AdamW(model.parameters(), lr=3e-3),
        max_duration=max_duration,
        algorithms=list(algorithms),
        callbacks=list(callbacks),
        loggers=list(loggers),
        device='cpu',
        precision='fp32',
        run_name=RUN_NAME,
        progress_bar=False,
        log_to_console=False,
        seed=0,
    )


def logged(in_memory_logger, name):
    """``[(batch, value), ...]`` of metric ``name``."""
    return [(int(timestamp.batch), value) for timestamp, value in in_memory_logger.data[name]]


def test_knn_monitor_logs_metrics_in_trainer(digits, caplog):
    caplog.set_level(logging.INFO, logger='composer_maect.callbacks.knn_monitor')
    in_memory = InMemoryLogger()
    monitor = KNNMonitor(str(digits / 'train'), str(digits / 'val'), img_size=IMG, k=[1, 10], interval='1ba')
    trainer = make_trainer(digits, [monitor], loggers=[in_memory])

    trainer.fit()
    trainer.close()

    names = [f'knn/{metric}@{k}' for k in (1, 10) for metric in ('top1', 'top5', 'purity')]
    for name in names:
        values = logged(in_memory, name)
        # FIT_START (batch 0), then BATCH_END at batches 1 and 2. FIT_END repeats nothing.
        assert [batch for batch, _ in values] == [0, 1, 2], name
        assert all(0.0 <= value <= 1.0 for _, value in values), name
    assert logged(in_memory, 'knn/uses_ema') == [(0, 0), (1, 0), (2, 0)]
    # 10 classes: chance is 0.1, and even an untrained ViT separates digits far better than that.
    assert logged(in_memory, 'knn/top1@10')[0][1] > 0.3
    assert logged(in_memory, 'knn/top5@10')[0][1] >= logged(in_memory, 'knn/top1@10')[0][1]

    assert monitor.last_results == {name: logged(in_memory, name)[-1][1] for name in [*names, 'knn/uses_ema']}
    lines = [record.getMessage() for record in caplog.records if record.name == 'composer_maect.callbacks.knn_monitor']
    assert len(lines) == 3
    assert 'with training weights and cls pooling' in lines[0]
    assert 'bank 1438, queries 359' in lines[0]


def test_knn_monitor_evaluates_ema_weights(digits):
    in_memory = InMemoryLogger()
    before = WeightSnapshots()
    after = WeightSnapshots()
    monitor = KNNMonitor(
        str(digits / 'train'), str(digits / 'val'), img_size=IMG, k=10, interval='1ba', max_train_samples=600
    )
    ema = EMA(half_life='2ba')
    trainer = make_trainer(digits, [before, monitor, after], algorithms=[ema], loggers=[in_memory])

    trainer.fit()

    # The EMA starts at the first BATCH_END, before the callbacks run.
    assert logged(in_memory, 'knn/uses_ema') == [(0, 0), (1, 1), (2, 1)]
    assert len(before.snapshots) == len(after.snapshots) == 3
    for snapshot_before, snapshot_after in zip(before.snapshots, after.snapshots, strict=True):
        for name, tensor in snapshot_before.items():
            assert torch.equal(snapshot_after[name], tensor), f'{name} changed while the monitor ran'
    assert not ema.ema_weights_active

    # The EMA weights differ from the training weights, and the last numbers are those of the EMA weights.
    training_state = trainer.state.model.state_dict()
    ema_model = ema.get_ema_model(copy.deepcopy(trainer.state.model))
    assert any(not torch.equal(ema_model.state_dict()[name], tensor) for name, tensor in training_state.items())
    expected = evaluate_directly(ema_model.encoder, digits, 'ema', max_train_samples=600)
    training_weights = evaluate_directly(trainer.state.model.encoder, digits, 'training', max_train_samples=600)
    for name in ('top1@10', 'top5@10', 'purity@10'):
        assert monitor.last_results[f'knn/{name}'] == pytest.approx(expected[name], abs=1e-9), name
    assert training_weights != expected
    trainer.close()


def evaluate_directly(vit, digits, name, max_train_samples=None):
    """k-NN metrics of ``vit`` computed with the functional API, on copies of the digits splits named ``name``."""
    transform = build_transform('eval', img_size=IMG)
    train_loader = build_image_dataloader(
        local=split_copy(digits, 'train', f'{name}_train'),
        batch_size=100,
        transform=transform,
        shuffle=False,
        drop_last=False,
    )
    val_loader = build_image_dataloader(
        local=split_copy(digits, 'val', f'{name}_val'),
        batch_size=100,
        transform=transform,
        shuffle=False,
        drop_last=False,
    )
    bank = extract_features(vit, train_loader, max_samples=max_train_samples)
    queries = extract_features(vit, val_loader)
    return knn_accuracy(bank[0], bank[1], queries[0], queries[1], ks=(10,), topk=(1, 5))


def test_knn_monitor_ignores_ema_when_disabled(digits):
    in_memory = InMemoryLogger()
    monitor = KNNMonitor(
        str(digits / 'train'),
        str(digits / 'val'),
        img_size=IMG,
        interval='1ep',
        use_ema=False,
        at_fit_start=False,
        max_train_samples=300,
    )
    trainer = make_trainer(digits, [monitor], algorithms=[EMA(half_life='1ba')], loggers=[in_memory])

    trainer.fit()
    trainer.close()

    # The epoch never ends in 2 batches, so only FIT_END evaluates.
    assert logged(in_memory, 'knn/uses_ema') == [(2, 0)]


def test_knn_monitor_remote_and_state(digits, tmp_path):
    cache = tmp_path / 'cache'
    local = KNNMonitor(split_copy(digits, 'train', 'a_train'), split_copy(digits, 'val', 'a_val'), img_size=IMG)
    remote = KNNMonitor(
        str(cache),
        str(cache),  # the same folder for both splits: each still gets its own cache
        img_size=IMG,
        train_remote=str(digits / 'train'),
        val_remote=str(digits / 'val'),
        pooling='cls',
    )
    complete = KNNMonitor(
        split_copy(digits, 'train', 'b_train'),
        split_copy(digits, 'val', 'b_val'),
        img_size=IMG,
        train_remote=str(tmp_path / 'no-such-remote'),
        val_remote=str(tmp_path / 'no-such-remote'),
    )
    trainer = make_trainer(digits, [local, remote, complete])

    local_results = local.evaluate(trainer.state, trainer.logger)
    remote_results = remote.evaluate(trainer.state, trainer.logger)
    complete_results = complete.evaluate(trainer.state, trainer.logger)
    trainer.close()

    assert os.path.isfile(cache / 'knn_monitor' / 'train' / 'index.json')
    assert os.path.isfile(cache / 'knn_monitor' / 'val' / 'index.json')
    assert remote_results == local_results
    assert complete_results == local_results

    state = remote.state_dict()
    assert json.loads(json.dumps(state)) == state
    restored = KNNMonitor(str(cache), str(cache), img_size=IMG)
    restored.load_state_dict(state)
    assert restored.last_results == remote_results


def test_knn_monitor_missing_split(digits, tmp_path):
    monitor = KNNMonitor(str(tmp_path / 'missing'), str(digits / 'val'), img_size=IMG)

    with pytest.raises(FileNotFoundError, match='does not exist and no remote is set'):
        make_trainer(digits, [monitor])


def test_knn_monitor_needs_one_vit():
    two_vits = nn.ModuleDict({'a': tiny_vit(), 'b': tiny_vit()})

    assert find_vision_transformer(nn.Sequential(nn.Identity(), two_vits['a'])) is two_vits['a']
    with pytest.raises(ValueError, match=r"found 2 timm VisionTransformers in the model, at \['a', 'b'\]"):
        find_vision_transformer(two_vits)
    with pytest.raises(ValueError, match='found no timm VisionTransformer'):
        find_vision_transformer(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ('kwargs', 'match'),
    [
        ({'pooling': 'max'}, 'Unknown pooling'),
        ({'k': 0}, 'k must be a positive int or a non-empty list'),
        ({'k': []}, 'k must be a positive int or a non-empty list'),
        ({'interval': '0ba'}, 'interval must be a positive Time'),
        ({'interval': '2iter'}, 'interval must be a positive Time'),
        ({'temperature': 0.005}, 'temperature must be at least'),
        ({'batch_size': 0}, 'batch_size must be a positive int'),
        ({'num_workers': -1}, 'num_workers must be a non-negative int'),
        ({'decoder': 'PIL'}, "Unknown decoder 'PIL'"),
        ({'max_train_samples': 0}, 'max_train_samples must be a positive int or None'),
        ({'img_size': 0}, 'img_size must be a positive int'),
        ({'std': (0.2, 0.0, 0.2)}, 'std values must be positive'),
    ],
)
def test_knn_monitor_rejects_invalid_arguments(tmp_path, kwargs, match):
    arguments = {'img_size': IMG, **kwargs}

    with pytest.raises(ValueError, match=match):
        KNNMonitor(str(tmp_path), str(tmp_path), **arguments)


def test_knn_monitor_evaluate_without_trainer(tmp_path):
    monitor = KNNMonitor(str(tmp_path), str(tmp_path), img_size=IMG)

    with pytest.raises(RuntimeError, match=r'builds its dataloaders at Event\.INIT'):
        monitor.evaluate(None, None)
