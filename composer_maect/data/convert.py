"""Convert an image source into MDS shards that ``ImageStreamingDataset`` reads.

Usage::

    python -m composer_maect.data.convert SOURCE OUT [--val-fraction F] [--seed S] [--compression C]
        [--size-limit L] [--no-progress]

SOURCE is ``mnist5k``, ``digits``, an ImageFolder (``root/<class>/<image>``) or the ImageNet layout (``root/train``
and ``root/val``, each with class folders). OUT is a local folder or any remote that Streaming writes to
(``s3://``, ``gs://``, ``oci://``, ...). The output is::

    OUT/train/{index.json, shard.00000.mds, ...}
    OUT/val/...            only when the source has a val split or F > 0
    OUT/metadata.json      classes, counts per split and class, the number and list of skipped files

Each sample has the columns ``image`` (the encoded file bytes, stored unchanged, or a lossless PNG for the array
sources), ``label`` (the class index, classes sorted by folder name) and ``index`` (the position in its split).
Every file is decoded once while converting. Files that fail to decode, and files without an image extension, are
left out, listed in ``metadata.json`` and reported at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import urllib.parse
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import ImageFile
from tqdm import tqdm

from composer_maect.data.decode import DECODE_ERRORS, decode_image
from composer_maect.data.remote import RemoteDataError, check_output_bucket
from composer_maect.data.sources import BUILTIN_SOURCES, SkippedFile, SourceImage, open_source

__all__ = ['COLUMNS', 'METADATA_FILENAME', 'ConversionReport', 'convert', 'main', 'split_holdout']

log = logging.getLogger(__name__)

COLUMNS = {'image': 'bytes', 'label': 'int', 'index': 'int'}
METADATA_FILENAME = 'metadata.json'

# Files are read and decoded on this many threads (PIL releases the GIL while decoding). The write order does not
# depend on it.
_NUM_READ_THREADS = min(8, os.cpu_count() or 1)

_MAX_SKIPPED_IN_SUMMARY = 20


@dataclass
class ConversionReport:
    """The outcome of ``convert``: what was written where, and which files were left out.

    Attributes:
        source: the source as given.
        out: the output location as given.
        layout: ``'imagefolder'``, ``'imagenet'``, ``'mnist5k'`` or ``'digits'``.
        seed: seed of the held-out split and of the write order.
        val_fraction: the requested held-out fraction (None when not requested).
        val_origin: ``'source'`` (the source's own val folder), ``'held_out'`` (taken from train) or None (no val).
        classes: class names, indexed by label.
        counts: images written per split and class name, ``{'train': {name: n}, 'val': {...}}``.
        skipped: files left out, with the reason.
        compression: the shard compression, or None.
        size_limit: the shard size limit passed to ``MDSWriter``.
    """

    source: str
    out: str
    layout: str
    seed: int
    val_fraction: float | None
    val_origin: str | None
    classes: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)
    compression: str | None = None
    size_limit: int | str = '64mb'

    @property
    def num_samples(self) -> dict[str, int]:
        """Images written per split."""
        return {split: sum(counts.values()) for split, counts in self.counts.items()}

    def to_dict(self) -> dict[str, Any]:
        """Return the content of ``metadata.json``.

        The output location is left out, so that two conversions with the same source and seed write identical
        files wherever they write them.
        """
        return {
            'source': self.source,
            'layout': self.layout,
            'seed': self.seed,
            'val_fraction': self.val_fraction,
            'val_origin': self.val_origin,
            'columns': dict(COLUMNS),
            'compression': self.compression,
            'size_limit': self.size_limit,
            'classes': list(self.classes),
            'num_samples': self.num_samples,
            'counts': {split: dict(counts) for split, counts in self.counts.items()},
            'num_skipped': len(self.skipped),
            'skipped': [skipped.to_dict() for skipped in self.skipped],
        }

    def format(self, max_skipped: int = _MAX_SKIPPED_IN_SUMMARY) -> str:
        """Return a human-readable summary that lists up to ``max_skipped`` skipped files."""
        classes = f'{len(self.classes)} class' + ('' if len(self.classes) == 1 else 'es')
        lines = [f'Converted {self.source} ({self.layout}, {classes}) into {self.out}']
        for split, num in self.num_samples.items():
            empty = [name for name, count in self.counts[split].items() if count == 0]
            note = f' ({len(empty)} classes without images: {", ".join(empty)})' if empty else ''
            lines.append(f'  {split}: {num} images{note}')
        if not self.skipped:
            lines.append('  skipped: none')
            return '\n'.join(lines)
        lines.append(f'  skipped: {len(self.skipped)} files')
        for skipped in self.skipped[:max_skipped]:
            lines.append(f'    {skipped.path}: {skipped.error}')
        if len(self.skipped) > max_skipped:
            lines.append(f'    ... and {len(self.skipped) - max_skipped} more, all listed in {METADATA_FILENAME}')
        return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Output locations
# ---------------------------------------------------------------------------------------------------------------------


def _is_remote(path: str) -> bool:
    # Streaming picks its uploader by URL scheme, and a path without a scheme is a local folder.
    return urllib.parse.urlparse(path).scheme != ''


def _join(path: str, name: str) -> str:
    return f'{path.rstrip("/")}/{name}' if _is_remote(path) else os.path.join(path, name)


def _split_out(out: str | tuple[str, str], split: str) -> str | tuple[str, str]:
    if isinstance(out, tuple):
        return (os.path.join(out[0], split), _join(out[1], split))
    return _join(out, split)


def _local_part(out: str | tuple[str, str]) -> str | None:
    """Return the local folder that receives the files, or None when only a temporary folder is used."""
    if isinstance(out, tuple):
        return os.path.expanduser(out[0])
    return None if _is_remote(out) else os.path.expanduser(out)


def _check_output_free(out: str | tuple[str, str]) -> None:
    """Raise FileExistsError when the local output already contains a split folder or metadata.json.

    NOTE: a remote output is not checked, because listing it needs credentials. Existing remote files with the same
    names are overwritten.
    """
    local = _local_part(out)
    if local is None:
        return
    if os.path.exists(local) and not os.path.isdir(local):
        raise FileExistsError(f'Output {local!r} exists and is not a folder. Choose a folder for OUT.')
    existing = []
    for name in ('train', 'val'):
        path = os.path.join(local, name)
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            existing.append(path)
    if os.path.exists(os.path.join(local, METADATA_FILENAME)):
        existing.append(os.path.join(local, METADATA_FILENAME))
    if existing:
        raise FileExistsError(
            f'Output folder {local!r} already contains converted data: {", ".join(existing)}. '
            f'Delete these paths or choose another OUT.'
        )


def _write_metadata(out: str | tuple[str, str], metadata: dict[str, Any]) -> None:
    """Write metadata.json into the local output and upload it to the remote output, if any."""
    text = json.dumps(metadata, indent=2) + '\n'
    local = _local_part(out)
    if local is not None:
        os.makedirs(local, exist_ok=True)
        with open(os.path.join(local, METADATA_FILENAME), 'w', encoding='utf-8') as file:
            file.write(text)
    if isinstance(out, tuple):
        remote = out[1]
    elif _is_remote(out):
        remote = out
    else:
        return

    from streaming.base.storage import CloudUploader

    # The uploader works from an empty staging folder, so it does not warn about the shards in the local output.
    with tempfile.TemporaryDirectory(prefix='maect-metadata-') as staging:
        uploader = CloudUploader.get((staging, remote), keep_local=True)
        with open(os.path.join(staging, METADATA_FILENAME), 'w', encoding='utf-8') as file:
            file.write(text)
        uploader.upload_file(METADATA_FILENAME)
    log.info('Uploaded %s to %s', METADATA_FILENAME, remote)


# ---------------------------------------------------------------------------------------------------------------------
# Splits and order
# ---------------------------------------------------------------------------------------------------------------------


def split_holdout(
    images: list[SourceImage], val_fraction: float, rng: np.random.Generator
) -> tuple[list[SourceImage], list[SourceImage]]:
    """Split images into train and val, stratified by label.

    The val split gets ``val_fraction * len(images)`` images rounded to the nearest int (halves up). Each class
    contributes its share
    ``val_fraction * n_class`` rounded down, and the images still missing go to the classes with the largest
    remainders (ties to the lower label). Within a class, the val images are drawn at random with ``rng``. Both
    returned lists keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}.')
    labels = np.array([image.label for image in images], dtype=np.int64)
    classes = np.unique(labels)
    shares = np.array([val_fraction * np.count_nonzero(labels == label) for label in classes])
    quotas = np.floor(shares).astype(np.int64)
    missing = math.floor(val_fraction * len(images) + 0.5) - int(quotas.sum())
    if missing > 0:
        # A stable sort on the negated remainders keeps the lower label first among ties.
        by_remainder = np.argsort(-(shares - quotas), kind='stable')
        quotas[by_remainder[:missing]] += 1

    in_val = np.zeros(len(images), dtype=bool)
    for label, quota in zip(classes, quotas, strict=True):
        members = np.flatnonzero(labels == label)
        in_val[rng.choice(members, size=int(quota), replace=False)] = True
    train = [image for image, held_out in zip(images, in_val, strict=True) if not held_out]
    val = [image for image, held_out in zip(images, in_val, strict=True) if held_out]
    return train, val


# ---------------------------------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _reject_truncated_images() -> Iterator[None]:
    """Make PIL raise on truncated files while converting, whatever another library set globally."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _read_checked(image: SourceImage) -> tuple[bytes | None, str | None]:
    """Return ``(encoded bytes, None)`` for an image that decodes, else ``(None, error message)``."""
    try:
        data = image.read_bytes()
    except OSError as err:
        return None, f'read failed: {err}'
    if image.path is None:
        return data, None  # Freshly encoded PNG from an array, so there is nothing to check.
    if not data:
        return None, 'empty file'
    try:
        # The dataset's own decoding, so that every image written decodes to RGB while training.
        decode_image(data)
    except DECODE_ERRORS as err:
        return None, f'decode failed: {type(err).__name__}: {err}'
    return data, None


def _iter_checked(images: Iterable[SourceImage]) -> Iterator[tuple[SourceImage, bytes | None, str | None]]:
    """Yield ``(image, bytes, error)`` in input order, reading and decoding ahead on a few threads."""
    max_pending = 4 * _NUM_READ_THREADS  # Bounds the memory held by images read ahead.
    iterator = iter(images)
    with ThreadPoolExecutor(max_workers=_NUM_READ_THREADS, thread_name_prefix='maect-convert') as pool:
        pending: deque[tuple[SourceImage, Future]] = deque()
        for image in iterator:
            pending.append((image, pool.submit(_read_checked, image)))
            if len(pending) >= max_pending:
                break
        while pending:
            image, future = pending.popleft()
            following = next(iterator, None)
            if following is not None:
                pending.append((following, pool.submit(_read_checked, following)))
            data, error = future.result()
            yield image, data, error


def _write_split(
    images: list[SourceImage],
    out: str | tuple[str, str],
    *,
    split: str,
    classes: list[str],
    compression: str | None,
    size_limit: int | str,
    progress: bool,
) -> tuple[dict[str, int], list[SkippedFile]]:
    """Write one split in the given order and return the counts per class name and the skipped files."""
    from streaming import MDSWriter

    counts = Counter({name: 0 for name in classes})
    skipped: list[SkippedFile] = []
    num_written = 0
    # A tuple output keeps its local copy; a remote URL is staged in a temporary folder that Streaming deletes.
    writer = MDSWriter(
        columns=COLUMNS,
        out=out,
        compression=compression,
        size_limit=size_limit,
        keep_local=isinstance(out, tuple),
        progress_bar=progress,
    )
    try:
        checked = _iter_checked(images)
        for image, data, error in tqdm(checked, total=len(images), desc=split, unit='img', disable=not progress):
            if data is None:
                skipped.append(SkippedFile(image.name, error or 'unknown error'))
                continue
            # The 'int' encoding accepts only Python ints, not numpy integers.
            writer.write({'image': data, 'label': int(image.label), 'index': num_written})
            counts[classes[image.label]] += 1
            num_written += 1
    except BaseException:
        # Leaving the writer unfinished means no index.json is written, so the partial split cannot be mistaken for
        # a complete one.
        writer.cancel_future_jobs()
        log.error('Converting split %s failed, so %s has no index.json. Delete it before converting again.', split, out)
        raise
    writer.finish()
    return dict(counts), skipped


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def _validate_arguments(val_fraction: float | None, seed: int, compression: str | None, size_limit: int | str) -> None:
    from streaming.base.compression import get_compressions, is_compression
    from streaming.base.util import bytes_to_int

    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}.')
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
    if compression is not None and not is_compression(compression):
        raise ValueError(f'Unknown compression {compression!r}. Valid: {sorted(get_compressions())} or None.')
    try:
        limit = bytes_to_int(size_limit)
    except ValueError as err:
        raise ValueError(f'Invalid size_limit {size_limit!r}: use bytes or a string such as "64mb".') from err
    if not 0 < limit < 2**32:
        raise ValueError(f'size_limit must be more than 0 and less than 4gb, got {size_limit!r}.')


def _warn_empty_classes(counts: dict[str, dict[str, int]]) -> None:
    for split, split_counts in counts.items():
        empty = [name for name, count in split_counts.items() if count == 0]
        if empty:
            log.warning('Split %s has no images of %d classes (kept with count 0): %s', split, len(empty), empty)


def convert(
    source: str,
    out: str | tuple[str, str],
    *,
    val_fraction: float | None = None,
    seed: int = 0,
    compression: str | None = None,
    size_limit: int | str = '64mb',
    progress: bool = True,
) -> ConversionReport:
    """Convert ``source`` into MDS shards under ``out`` and write ``out/metadata.json``.

    The same source and seed always give byte-identical shards. Each split is written in the order of a
    permutation drawn from ``numpy.random.default_rng(seed)``, after the held-out split (if any) was drawn from the
    same generator.

    Args:
        source: ``'mnist5k'``, ``'digits'``, an ImageFolder path or an ImageNet layout path (``train`` and ``val``
            sub-folders).
        out: a local folder, a remote URL (written through a temporary folder, then uploaded), or a pair
            ``(local folder, remote)`` that keeps the local copy and uploads it.
        val_fraction: fraction of the images held out as the val split, stratified by class (see
            ``split_holdout``). Unreadable files are found after the split, so val can end up a few images short
            of ``val_fraction * n``. None or 0 writes no held-out split. A source with its own val folder
            rejects a value above 0.
        seed: seed of the held-out split and the write order; a non-negative int.
        compression: shard compression such as ``'zstd'`` or ``'zstd:7'``; None stores shards uncompressed.
        size_limit: maximum shard size in bytes, or a string such as ``'64mb'``.
        progress: show a progress bar per split.

    Returns:
        The report, which is also the content of ``metadata.json`` (``report.to_dict()``).

    Raises:
        FileNotFoundError: ``source`` is neither a builtin name nor a folder.
        FileExistsError: the local output already contains a split folder or ``metadata.json``.
        RemoteDataError: an ``s3://`` output whose bucket does not exist or cannot be reached, or no credentials.
        ValueError: an invalid argument, a source without readable images, or a val_fraction that leaves val empty.
    """
    _validate_arguments(val_fraction, seed, compression, size_limit)
    source = os.fspath(source)
    if isinstance(out, os.PathLike):
        out = os.fspath(out)
    if isinstance(out, tuple):
        out = (os.path.expanduser(out[0]), out[1])
    elif not _is_remote(out):
        out = os.path.expanduser(out)
    _check_output_free(out)
    check_output_bucket(out[1] if isinstance(out, tuple) else out, setting='OUT')

    image_source = open_source(source)
    empty_splits = [split for split, images in image_source.splits.items() if not images]
    if empty_splits:
        raise ValueError(f'{source!r} has no image files in split {", ".join(empty_splits)}.')
    rng = np.random.default_rng(seed)
    splits = dict(image_source.splits)
    if image_source.has_val_split:
        if val_fraction:
            raise ValueError(
                f'{source!r} already has a val folder, so val_fraction must be None or 0 (got {val_fraction}).'
            )
        val_origin = 'source'
    elif val_fraction:
        splits['train'], splits['val'] = split_holdout(splits['train'], val_fraction, rng)
        if not splits['val']:
            raise ValueError(
                f'val_fraction {val_fraction} of {len(image_source.splits["train"])} images leaves the val split '
                f'empty. Use a larger val_fraction.'
            )
        val_origin = 'held_out'
    else:
        val_origin = None

    report = ConversionReport(
        source=source,
        out=str(out),
        layout=image_source.layout,
        seed=seed,
        val_fraction=val_fraction,
        val_origin=val_origin,
        classes=image_source.classes,
        skipped=list(image_source.skipped),
        compression=compression,
        size_limit=size_limit,
    )
    log.info(
        'Converting %s (%s, %d classes): %s',
        source,
        image_source.layout,
        len(image_source.classes),
        ', '.join(f'{split} {len(images)} candidate images' for split, images in splits.items()),
    )

    with _reject_truncated_images():
        for split, images in splits.items():
            order = rng.permutation(len(images))
            counts, skipped = _write_split(
                [images[position] for position in order],
                _split_out(out, split),
                split=split,
                classes=image_source.classes,
                compression=compression,
                size_limit=size_limit,
                progress=progress,
            )
            report.counts[split] = counts
            report.skipped.extend(skipped)
            log.info(
                'Wrote split %s: %d images, %d files that failed to decode left out',
                split,
                sum(counts.values()),
                len(skipped),
            )
            if not any(counts.values()):
                raise ValueError(
                    f'No readable image in split {split} of {source!r}. All {len(skipped)} files failed to decode, '
                    f'for example {skipped[0].path}: {skipped[0].error}'
                )

    _write_metadata(out, report.to_dict())
    _warn_empty_classes(report.counts)
    if report.skipped:
        log.warning(
            'Skipped %d unreadable or non-image files, all listed in %s:\n%s',
            len(report.skipped),
            METADATA_FILENAME,
            '\n'.join(f'  {item.path}: {item.error}' for item in report.skipped[:_MAX_SKIPPED_IN_SUMMARY]),
        )
    log.info('Finished converting %s into %s: %s', source, out, report.num_samples)
    return report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m composer_maect.data.convert',
        description='Convert images into MDS shards (columns image, label, index) for ImageStreamingDataset.',
    )
    parser.add_argument(
        'source',
        help=f'one of {", ".join(BUILTIN_SOURCES)}, an ImageFolder root/<class>/<image>, or a folder with '
        'train/ and val/ ImageFolders (the ImageNet layout)',
    )
    parser.add_argument('out', help='output folder, or a remote URL that Streaming uploads to (s3://, gs://, ...)')
    parser.add_argument(
        '--val-fraction',
        type=float,
        default=None,
        metavar='F',
        help='fraction in [0, 1) of the images held out as val, stratified by class; only for sources without a '
        'val folder (default: no held-out split)',
    )
    parser.add_argument('--seed', type=int, default=0, help='seed of the held-out split and write order (default: 0)')
    parser.add_argument(
        '--compression', default=None, help='shard compression, for example zstd or zstd:7 (default: none)'
    )
    parser.add_argument(
        '--size-limit', default='64mb', help='maximum shard size in bytes or with a unit, such as 64mb (default: 64mb)'
    )
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bars')
    args = parser.parse_args(argv)
    if args.size_limit.isdigit():
        args.size_limit = int(args.size_limit)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the converter CLI and return the exit status: 0 on success, 1 when the conversion fails."""
    args = _parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        report = convert(
            args.source,
            args.out,
            val_fraction=args.val_fraction,
            seed=args.seed,
            compression=args.compression,
            size_limit=args.size_limit,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, RemoteDataError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == '__main__':
    # Run the imported module, so that its logger is named composer_maect.data.convert and not __main__.
    from composer_maect.data.convert import main as convert_main

    sys.exit(convert_main())
