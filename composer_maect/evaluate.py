"""Evaluate a frozen encoder: k-NN, linear probe, k-means clustering, low-shot logistic regression and plots.

Usage::

    python -m composer_maect.evaluate CHECKPOINT --train DIR_OR_URL --test DIR_OR_URL --encoder NAME \\
        --img-size N --patch-size P [--timm-kwargs JSON] [--pooling cls|mean_patch] [--weights ema|raw] \\
        [--mean M ...] [--std S ...] [--resize-size N] [--decoder auto|pil] [--k 10 20] [--out OUT] \\
        [--protocols knn,linear,clustering,lowshot]

The encoder is loaded from a checkpoint of this package (MAE model keys under ``encoder.vit.*``, ``ViTEncoderModel``
keys under ``encoder.*``) or an official MAE ``{'model': ...}`` file. With Composer's EMA algorithm in the checkpoint,
the EMA weights are evaluated unless ``--weights raw`` is given.

The features of both splits are extracted once, in eval mode under ``torch.no_grad``, and cached in
``OUT/features-<hash>.pt``. The hash covers the checkpoint's path, modification time and size, the weights, the
pooling, the encoder arguments, the image pipeline and the data folders, so a changed input is extracted again.
Launched with ``composer -n N -m composer_maect.evaluate ...``, every rank extracts its share of each split, the
features are gathered, and rank 0 runs the protocols and writes ``OUT/results.json``, the PNGs and the table.

Exit status: 0 on success, 2 for invalid arguments or inputs (the printed message names the invalid one).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer_maect.data.decode import DECODERS

__all__ = [
    'PROTOCOLS',
    'EvaluationInputError',
    'evaluate_encoder',
    'load_encoder',
    'main',
    'run_protocols',
]

log = logging.getLogger('composer_maect.evaluate')  # __name__ is '__main__' under python -m

PROTOCOLS = ('knn', 'linear', 'clustering', 'lowshot')
RESULTS_SCHEMA_VERSION = 1
_CACHE_FORMAT = 1


class EvaluationInputError(ValueError):
    """An invalid argument or input file. The CLI prints the message and exits with status 2."""


# ---------------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------------


def load_encoder(
    checkpoint_path: str | Path,
    *,
    encoder: str,
    img_size: int,
    patch_size: int | None,
    timm_kwargs: Mapping[str, Any] | None = None,
    weights: str | None = None,
) -> tuple[nn.Module, str]:
    """Create the ViT ``encoder`` and load the encoder weights of a checkpoint into it.

    Returns:
        ``(vit, weights)`` where ``weights`` is ``'ema'`` or ``'raw'``, the set that was loaded.

    Raises:
        EvaluationInputError: a missing or unreadable checkpoint, unavailable EMA weights, an invalid encoder
            specification, or weights that do not match the encoder (the message lists the differences).
    """
    from composer_maect.checkpoints import has_ema_weights, load_checkpoint_file, load_encoder_weights
    from composer_maect.models.vit import create_encoder

    try:
        vit = create_encoder(encoder, img_size=img_size, patch_size=patch_size, **dict(timm_kwargs or {}))
    except (TypeError, ValueError) as error:
        raise EvaluationInputError(f'Invalid encoder specification: {error}') from error
    if weights not in (None, 'ema', 'raw'):
        raise EvaluationInputError(f"weights must be 'ema', 'raw' or None, got {weights!r}.")
    try:
        if weights is None:
            # EMA weights when the checkpoint has them. A sharded folder is read only by the loader, so it uses raw.
            is_file = Path(checkpoint_path).is_file()
            weights = 'ema' if is_file and has_ema_weights(load_checkpoint_file(checkpoint_path, mmap=True)) else 'raw'
        load_encoder_weights(vit, checkpoint_path, weights=weights)
    except (FileNotFoundError, ValueError) as error:
        raise EvaluationInputError(
            f'{error} If the encoder does not match, set --encoder, --img-size, --patch-size and --timm-kwargs as '
            'in the training config.'
        ) from error
    log.info('Loaded the encoder (%s weights) from %s.', weights, checkpoint_path)
    return vit, weights


# ---------------------------------------------------------------------------------------------------------------------
# Protocols on features
# ---------------------------------------------------------------------------------------------------------------------


def _knn_results(train, test, options: Mapping[str, Any]) -> dict:
    from composer_maect.evaluation.knn import knn_accuracy

    num_train = train[0].shape[0]
    ks = sorted(set(options['ks']))
    clipped = [k for k in ks if k > num_train]
    if clipped:
        log.warning(
            'k values %s are larger than the %d train samples and are clipped to %d.', clipped, num_train, num_train
        )
    results = {}
    for variant, standardize in (('standardized', True), ('plain', False)):
        with warnings.catch_warnings():
            # The clipping is logged once above.
            warnings.filterwarnings('ignore', message=r'k=\d+ is larger than')
            results[variant] = knn_accuracy(
                train[0], train[1], test[0], test[1], ks=ks, temperature=options['temperature'], standardize=standardize
            )
    results['settings'] = {
        'ks': ks,
        'clipped_to': num_train if clipped else None,
        'temperature': options['temperature'],
        'similarity': 'cosine, votes exp(similarity / temperature)',
        'standardized': 'every dimension standardised with the train mean and std, then L2-normalised',
        'plain': 'L2-normalised only',
        'bank': 'the whole train split',
    }
    return results


def _knn_predictions(train, test, k: int, temperature: float) -> torch.Tensor:
    from composer_maect.evaluation.knn import knn_predict

    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'k=\d+ is larger than')
        scores = knn_predict(train[0], train[1], test[0], k=k, temperature=temperature, standardize=True)
    classes = torch.unique(train[1].long(), sorted=True)
    return classes[scores.argmax(dim=1).cpu()]


def run_protocols(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    protocols: Iterable[str] = PROTOCOLS,
    options: Mapping[str, Any] | None = None,
    plots_dir: str | Path | None = None,
) -> dict:
    """Run the evaluation protocols on ``(features [N, D], labels [N])`` of the train and test splits.

    Args:
        train, test: features and integer labels (any values) of both splits.
        protocols: a subset of ``PROTOCOLS``.
        options: protocol settings, defaults in :func:`default_options`.
        plots_dir: folder for ``tsne.png`` and (with k-NN) ``knn_confusion.png``, or None for no plots.

    Returns:
        A dict with one entry per protocol run, ``'plots'`` and ``'seconds'`` (wall time per protocol).
    """
    from composer_maect.evaluation.clustering import kmeans_clustering
    from composer_maect.evaluation.linear_probe import train_linear_probes
    from composer_maect.evaluation.lowshot import lowshot_logistic_regression
    from composer_maect.evaluation.plots import plot_confusion_matrix, plot_tsne

    options = {**default_options(), **dict(options or {})}
    protocols = list(protocols)
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise EvaluationInputError(f'Unknown protocols {unknown}. Valid protocols: {list(PROTOCOLS)}.')

    results: dict[str, Any] = {'seconds': {}}
    runners = {
        'knn': lambda: _knn_results(train, test, options),
        'linear': lambda: train_linear_probes(
            *train,
            *test,
            lrs=options['probe_lrs'],
            epochs=options['probe_epochs'],
            batch_size=options['probe_batch_size'],
            val_fraction=options['probe_val_fraction'],
            seed=options['seed'],
        ).to_dict(),
        'clustering': lambda: kmeans_clustering(test[0], test[1], seeds=options['clustering_seeds']),
        'lowshot': lambda: lowshot_logistic_regression(
            *train,
            *test,
            shots=options['lowshot_shots'],
            percents=options['lowshot_percents'],
            num_splits=options['lowshot_splits'],
            seed=options['seed'],
        ),
    }
    names = {'knn': 'knn', 'linear': 'linear_probe', 'clustering': 'clustering', 'lowshot': 'lowshot'}
    for protocol in PROTOCOLS:
        if protocol not in protocols:
            continue
        log.info('Running the %s protocol.', protocol)
        start = time.perf_counter()
        results[names[protocol]] = runners[protocol]()
        results['seconds'][protocol] = round(time.perf_counter() - start, 2)
        log.info('Finished the %s protocol in %.1f s.', protocol, results['seconds'][protocol])

    if 'clustering' in results:
        results['clustering']['split'] = 'test'

    results['plots'] = {}
    if plots_dir is not None:
        start = time.perf_counter()
        results['plots']['tsne'] = plot_tsne(
            test[0], test[1], Path(plots_dir) / 'tsne.png', max_samples=options['tsne_samples'], seed=options['seed']
        )
        if 'knn' in protocols:
            k = min(min(options['ks']), train[0].shape[0])
            predictions = _knn_predictions(train, test, k, options['temperature'])
            confusion = plot_confusion_matrix(
                test[1],
                predictions,
                Path(plots_dir) / 'knn_confusion.png',
                title=f'k-NN (k={k}, standardised) on the test split',
            )
            confusion['k'] = k
            confusion['standardized'] = True
            results['plots']['knn_confusion'] = confusion
        results['seconds']['plots'] = round(time.perf_counter() - start, 2)
    return results


def default_options() -> dict[str, Any]:
    """Return the default protocol settings of :func:`run_protocols`."""
    from composer_maect.evaluation.linear_probe import DEFAULT_PROBE_LRS

    return {
        'ks': [10, 20],
        'temperature': 0.07,
        'probe_lrs': list(DEFAULT_PROBE_LRS),
        'probe_epochs': 50,
        'probe_batch_size': 1024,
        'probe_val_fraction': 0.1,
        'clustering_seeds': [0, 1, 2, 3, 4],
        'lowshot_shots': [1, 2, 5],
        'lowshot_percents': [1.0],
        'lowshot_splits': 3,
        'tsne_samples': 2000,
        'seed': 0,
    }


@contextlib.contextmanager
def _unchanged_check(model: nn.Module):
    """Fail if ``model``'s parameters or buffers change inside the context."""
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    yield
    after = model.state_dict()
    changed = [name for name, tensor in before.items() if not torch.equal(tensor, after[name])]
    if changed:
        raise RuntimeError(f'Evaluation changed the encoder tensors {changed[:5]}. This is a bug in the evaluation.')


def evaluate_encoder(
    vit: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    pooling: str = 'cls',
    protocols: Iterable[str] = PROTOCOLS,
    options: Mapping[str, Any] | None = None,
    plots_dir: str | Path | None = None,
) -> dict:
    """Extract the pooled features of both loaders with ``vit`` and run :func:`run_protocols` on them.

    The encoder runs in eval mode under ``torch.no_grad``, and every submodule gets its own training flag back.
    This function checks that no parameter or buffer changed and raises ``RuntimeError`` otherwise.
    """
    from composer_maect.evaluation.features import extract_features

    with _unchanged_check(vit):
        train_features, train_labels, _ = extract_features(vit, train_loader, pooling=pooling)
        test_features, test_labels, _ = extract_features(vit, test_loader, pooling=pooling)
    return run_protocols(
        (train_features, train_labels),
        (test_features, test_labels),
        protocols=protocols,
        options=options,
        plots_dir=plots_dir,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Data and feature cache
# ---------------------------------------------------------------------------------------------------------------------


def _is_remote(location: str) -> bool:
    # NOTE: remote splits (s3://, gs://, ...) go through Streaming's download code, which the tests here do not run
    # because they reach no network. Their cache key is the URL alone, so changed remote shards need --no-cache.
    return '://' in location


def _data_key(location: str) -> dict:
    if _is_remote(location):
        return {'remote': location}
    index = Path(location) / 'index.json'
    if not index.is_file():
        raise EvaluationInputError(
            f'No MDS shards in {location!r}: index.json not found. Pass the folder of one split (such as '
            'DATA/train), as `python -m composer_maect.data.convert SOURCE OUT` writes it.'
        )
    stat = index.stat()
    return {'local': os.path.realpath(location), 'index_mtime_ns': stat.st_mtime_ns, 'index_size': stat.st_size}


def _cache_key(args: argparse.Namespace, weights: str) -> dict:
    path = os.path.realpath(args.checkpoint)
    stat = os.stat(path)
    return {
        'format': _CACHE_FORMAT,
        'checkpoint': path,
        'checkpoint_mtime_ns': stat.st_mtime_ns,
        'checkpoint_size': stat.st_size,
        'weights': weights,
        'pooling': args.pooling,
        'encoder': args.encoder,
        'img_size': args.img_size,
        'patch_size': args.patch_size,
        'timm_kwargs': args.timm_kwargs,
        'mean': args.mean,
        'std': args.std,
        'resize_size': args.resize_size,
        'decoder': args.decoder,
        'train': _data_key(args.train),
        'test': _data_key(args.test),
    }


def _cache_path(out: Path, key: Mapping) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return out / f'features-{digest}.pt'


def _read_cache(path: Path, key: Mapping) -> dict | None:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        log.warning('Ignoring the unreadable feature cache %s (%s: %s).', path, type(error).__name__, error)
        return None
    if not isinstance(cached, dict) or cached.get('key') != dict(key):
        log.warning('Ignoring the feature cache %s: it was written for other inputs.', path)
        return None
    return cached


def _build_loader(location: str, split: str, args: argparse.Namespace, out: Path):
    from composer_maect.data.dataset import build_image_dataloader
    from composer_maect.data.transforms import build_transform

    options = {} if args.resize_size is None else {'resize_size': args.resize_size}
    try:
        transform = build_transform('eval', img_size=args.img_size, mean=args.mean, std=args.std, **options)
    except ValueError as error:
        raise EvaluationInputError(f'Invalid image pipeline: {error}') from error
    if _is_remote(location):
        local, remote = str(out / 'shard_cache' / split), location
    else:
        local, remote = location, None
    return build_image_dataloader(
        local=local,
        remote=remote,
        batch_size=args.batch_size,
        transform=transform,
        shuffle=False,
        drop_last=False,
        decoder=args.decoder,
        num_workers=args.num_workers,
    )


def _extract(vit: nn.Module, args: argparse.Namespace, out: Path, device: torch.device) -> dict:
    from composer_maect.evaluation.features import extract_features

    vit.to(device)
    features = {}
    for split, location in (('train', args.train), ('test', args.test)):
        start = time.perf_counter()
        loader = _build_loader(location, split, args, out)
        values, labels, indices = extract_features(vit, loader, pooling=args.pooling, device=device)
        features[split] = {'features': values, 'labels': labels, 'indices': indices}
        log.info(
            'Extracted %d %s features of dimension %d in %.1f s.',
            values.shape[0],
            split,
            values.shape[1],
            time.perf_counter() - start,
        )
    return features


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f'invalid positive int {text!r}') from error
    if value < 1:
        raise argparse.ArgumentTypeError(f'invalid positive int {text!r}')
    return value


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m composer_maect.evaluate',
        description='Evaluate the frozen encoder of a checkpoint with k-NN, a linear probe, k-means clustering and '
        'low-shot logistic regression, and write results.json, a t-SNE plot and a k-NN confusion matrix.',
    )
    parser.add_argument(
        'checkpoint', help='checkpoint file of this package (Composer .pt) or an MAE {"model": ...} file'
    )
    parser.add_argument('--train', required=True, help='MDS folder (with index.json) or remote URL of the train split')
    parser.add_argument('--test', required=True, help='MDS folder or remote URL of the test split')
    parser.add_argument('--encoder', required=True, help="encoder name, e.g. 'vit_tiny_patch16' or a timm ViT name")
    parser.add_argument('--img-size', type=_positive_int, required=True, help='image side in pixels')
    parser.add_argument('--patch-size', type=_positive_int, required=True, help='patch side in pixels')
    parser.add_argument('--timm-kwargs', default='{}', help='JSON object of extra timm.create_model arguments')

    parser.add_argument('--pooling', choices=('cls', 'mean_patch'), default='cls', help='feature pooling')
    parser.add_argument(
        '--weights',
        choices=('ema', 'raw'),
        default=None,
        help="'ema' for the EMA weights, 'raw' for the training weights (default: ema when the checkpoint has them)",
    )
    parser.add_argument(
        '--mean', '--pixel-mean', type=float, nargs='+', default=None, help='per-channel mean on the 0..1 scale'
    )
    # The `composer` launcher reads `--std` as an ambiguous abbreviation of its own --stdout and --stderr, so runs
    # under `composer -n N` need the spelling --pixel-std.
    parser.add_argument(
        '--std',
        '--pixel-std',
        type=float,
        nargs='+',
        default=None,
        help='per-channel std on the 0..1 scale (write --pixel-std under the composer launcher)',
    )
    parser.add_argument('--resize-size', type=_positive_int, default=None, help='resize side before the centre crop')
    parser.add_argument(
        '--decoder',
        choices=DECODERS,
        default='auto',
        help='image decoder: auto (JPEGs with torchvision.io.decode_jpeg, other formats with PIL) or pil',
    )

    parser.add_argument('--k', type=_positive_int, nargs='+', default=[10, 20], help='k-NN neighbour counts')
    parser.add_argument('--temperature', type=float, default=0.07, help='k-NN vote temperature')
    parser.add_argument('--out', default='eval_out', help='output folder for results.json, PNGs and the cache')
    parser.add_argument('--protocols', default=','.join(PROTOCOLS), help=f'comma-separated subset of {PROTOCOLS}')

    parser.add_argument('--probe-epochs', type=_positive_int, default=50, help='linear probe epochs')
    parser.add_argument('--probe-batch-size', type=_positive_int, default=1024, help='linear probe batch size')
    parser.add_argument('--probe-lrs', type=float, nargs='+', default=None, help='linear probe learning-rate grid')
    parser.add_argument(
        '--probe-val-fraction', type=float, default=0.1, help='fraction of train held out to select the probe lr'
    )
    parser.add_argument('--clustering-seeds', type=_positive_int, default=5, help='number of k-means seeds')
    parser.add_argument('--lowshot-shots', type=_positive_int, nargs='+', default=[1, 2, 5], help='images per class')
    parser.add_argument('--lowshot-percent', type=float, nargs='*', default=[1.0], help='percentages of each class')
    parser.add_argument('--lowshot-splits', type=_positive_int, default=3, help='seeded splits per low-shot setting')
    parser.add_argument('--tsne-samples', type=_positive_int, default=2000, help='max test samples in the t-SNE plot')
    parser.add_argument('--seed', type=int, default=0, help='seed of the probe, low-shot splits and t-SNE')

    parser.add_argument('--batch-size', type=_positive_int, default=256, help='images per forward pass per rank')
    parser.add_argument('--num-workers', type=int, default=0, help='DataLoader worker processes per split')
    parser.add_argument('--no-plots', action='store_true', help='skip the t-SNE and confusion-matrix PNGs')
    parser.add_argument('--no-cache', action='store_true', help='extract the features even when a cache exists')
    return parser.parse_args(argv)


def _validate(args: argparse.Namespace) -> None:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    try:
        args.timm_kwargs = json.loads(args.timm_kwargs)
    except json.JSONDecodeError as error:
        raise EvaluationInputError(f'--timm-kwargs is not valid JSON ({error}): {args.timm_kwargs!r}.') from error
    if not isinstance(args.timm_kwargs, dict):
        raise EvaluationInputError(
            f'--timm-kwargs must be a JSON object such as {{"depth": 6}}, got {args.timm_kwargs!r}.'
        )
    for name, default in (('mean', IMAGENET_DEFAULT_MEAN), ('std', IMAGENET_DEFAULT_STD)):
        values = getattr(args, name)
        if values is None:
            values = list(default)
        elif len(values) == 1:
            values = values * 3
        elif len(values) != 3:
            raise EvaluationInputError(f'--{name} takes 1 value (for all channels) or 3 (RGB), got {values}.')
        setattr(args, name, [float(value) for value in values])
    protocols = [name.strip() for name in args.protocols.split(',') if name.strip()]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if not protocols or unknown:
        raise EvaluationInputError(
            f'--protocols {args.protocols!r} has unknown or no protocols {unknown}. Valid: {",".join(PROTOCOLS)}.'
        )
    args.protocol_list = protocols
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise EvaluationInputError(f'--temperature must be a positive number, got {args.temperature}.')
    if not 0 <= args.probe_val_fraction < 1:
        raise EvaluationInputError(f'--probe-val-fraction must be in [0, 1), got {args.probe_val_fraction}.')
    if args.probe_lrs is not None and not all(math.isfinite(lr) and lr > 0 for lr in args.probe_lrs):
        raise EvaluationInputError(f'--probe-lrs must be positive numbers, got {args.probe_lrs}.')
    if any(not 0 < percent <= 100 for percent in args.lowshot_percent):
        raise EvaluationInputError(f'--lowshot-percent values must be in (0, 100], got {args.lowshot_percent}.')
    if args.num_workers < 0:
        raise EvaluationInputError(f'--num-workers must be 0 or more, got {args.num_workers}.')
    if not os.path.exists(args.checkpoint):
        raise EvaluationInputError(f'Checkpoint {args.checkpoint!r} not found.')
    for name in ('train', 'test'):
        _data_key(getattr(args, name))  # fails early on a local folder without shards


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = default_options()
    options.update(
        ks=args.k,
        temperature=args.temperature,
        probe_epochs=args.probe_epochs,
        probe_batch_size=args.probe_batch_size,
        probe_val_fraction=args.probe_val_fraction,
        clustering_seeds=list(range(args.clustering_seeds)),
        lowshot_shots=args.lowshot_shots,
        lowshot_percents=args.lowshot_percent,
        lowshot_splits=args.lowshot_splits,
        tsne_samples=args.tsne_samples,
        seed=args.seed,
    )
    if args.probe_lrs is not None:
        options['probe_lrs'] = args.probe_lrs
    return options


def _percent(value: float) -> str:
    return f'{100 * value:6.2f}'


def format_table(results: Mapping[str, Any]) -> str:
    """Return the headline numbers of ``results`` as an aligned text table (accuracies in percent)."""
    rows: list[tuple[str, str]] = []
    knn = results.get('knn')
    if knn:
        for variant in ('standardized', 'plain'):
            for k in knn['settings']['ks']:
                rows.append((f'k-NN top-1, k={k}, {variant}', _percent(knn[variant][f'top1@{k}'])))
    probe = results.get('linear_probe')
    if probe:
        if probe['val_selected'] is not None:
            selected = probe['val_selected']
            rows.append(
                (
                    f'linear probe, lr {selected["lr"]:g} ep {selected["epoch"]} selected on held-out train',
                    _percent(selected['test_accuracy']),
                )
            )
        best = probe['test_selected']
        rows.append(
            (
                f'linear probe, best on test (lr {best["lr"]:g} ep {best["epoch"]}, as MAE-CT reports)',
                _percent(best['test_accuracy']),
            )
        )
    clustering = results.get('clustering')
    if clustering:
        seeds = len(clustering['per_seed'])
        for metric, label in (('accuracy', 'ACC'), ('nmi', 'NMI'), ('ari', 'ARI')):
            rows.append(
                (
                    f'k-means {label}, mean / best of {seeds} seeds',
                    f'{_percent(clustering["mean"][metric])} / {_percent(clustering["best"][metric]).strip()}',
                )
            )
    lowshot = results.get('lowshot')
    if lowshot:
        for name, entry in lowshot.items():
            if name in ('skipped', 'settings'):
                continue
            label = name.replace('_per_class', ' per class').replace('_percent', '%')
            rows.append(
                (
                    f'low-shot logistic regression, {label} ({len(entry["accuracies"])} splits)',
                    f'{_percent(entry["mean"])} ± {100 * entry["std"]:.2f}',
                )
            )
        for name in lowshot.get('skipped', {}):
            rows.append((f'low-shot {name}', 'skipped'))
    width = max((len(label) for label, _ in rows), default=10)
    lines = [f'{"metric":<{width}}  accuracy %', f'{"-" * width}  ----------']
    lines += [f'{label:<{width}}  {value}' for label, value in rows]
    return '\n'.join(lines)


def _init_distributed() -> torch.device:
    """Initialise the process group when launched by ``composer -n N``; return the device for the forward passes."""
    from composer.utils import dist, get_device

    device = get_device(None)
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        dist.initialize_dist(device)
    return device._device


def _run(args: argparse.Namespace) -> dict | None:
    from composer_maect.distributed import rank

    out = Path(args.out)
    device = _init_distributed()
    vit, weights = load_encoder(
        args.checkpoint,
        encoder=args.encoder,
        img_size=args.img_size,
        patch_size=args.patch_size,
        timm_kwargs=args.timm_kwargs,
        weights=args.weights,
    )
    key = _cache_key(args, weights)
    cache_path = _cache_path(out, key)
    cached = None if args.no_cache else _read_cache(cache_path, key)
    if cached is not None:
        log.info('Read the features from the cache %s.', cache_path)
        features = cached['features']
    else:
        out.mkdir(parents=True, exist_ok=True)
        features = _extract(vit, args, out, device)
        if rank() == 0:
            torch.save({'key': key, 'features': features}, cache_path)
            log.info('Wrote the feature cache %s.', cache_path)
    if rank() != 0:
        return None

    train = (features['train']['features'], features['train']['labels'])
    test = (features['test']['features'], features['test']['labels'])
    for split, (values, _) in (('train', train), ('test', test)):
        if values.shape[0] == 0:
            raise EvaluationInputError(f'The {split} split {getattr(args, split)!r} has no samples.')
    try:
        results = run_protocols(
            train,
            test,
            protocols=args.protocol_list,
            options=_options(args),
            plots_dir=None if args.no_plots else out,
        )
    except ValueError as error:
        # The protocols validate their inputs with ValueError (too few samples, a single class, ...).
        raise EvaluationInputError(f'The evaluation failed on these features: {error}') from error
    classes = torch.unique(train[1]).tolist()
    document = {
        'schema_version': RESULTS_SCHEMA_VERSION,
        'checkpoint': {'path': args.checkpoint, 'resolved_path': key['checkpoint'], 'weights': weights},
        'encoder': {
            'name': args.encoder,
            'img_size': args.img_size,
            'patch_size': args.patch_size,
            'timm_kwargs': args.timm_kwargs,
            'pooling': args.pooling,
            'embed_dim': int(train[0].shape[1]),
        },
        'data': {
            'train': args.train,
            'test': args.test,
            'num_train': int(train[0].shape[0]),
            'num_test': int(test[0].shape[0]),
            'num_classes': len(classes),
            'classes': classes,
            'transform': {
                'img_size': args.img_size,
                'resize_size': args.resize_size,
                'mean': args.mean,
                'std': args.std,
                'decoder': args.decoder,
            },
        },
        'feature_cache': str(cache_path),
        'protocols': args.protocol_list,
        'options': _options(args),
        **results,
    }
    with open(out / 'results.json', 'w') as file:
        json.dump(document, file, indent=2)
    print(
        f'{args.checkpoint} ({weights} weights, {args.pooling} pooling): {train[0].shape[0]} train and '
        f'{test[0].shape[0]} test samples, {len(classes)} classes'
    )
    print(format_table(results))
    print(f'Wrote {out / "results.json"}')
    return document


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for invalid arguments or inputs)."""
    args = _parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        _validate(args)
        _run(args)
    except EvaluationInputError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
