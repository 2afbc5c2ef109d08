"""The streaming image dataset over the converter's MDS shards, and its DataLoader.

``ImageStreamingDataset`` reads the columns ``image`` (encoded bytes), ``label`` and ``index`` that
``composer_maect.data.convert`` writes, decodes each image to RGB (JPEGs with ``torchvision.io.decode_jpeg``, other
formats with PIL; see ``composer_maect.data.decode``) and applies one pipeline per view.
Batches from the default collate are flat dicts of tensors::

    views == 1: {'image': [B, 3, H, W] float, 'label': [B] int64, 'index': [B] int64}
    views == 2: {'view0': [B, 3, H, W], 'view1': [B, 3, H, W], 'label': [B], 'index': [B]}
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from composer_maect.data.decode import DECODE_ERRORS, check_decoder, decode_image, decode_rgb
from composer_maect.data.shards import check_local_shards

__all__ = ['CorruptSampleError', 'ImageStreamingDataset', 'build_image_dataloader', 'decode_image', 'sample_draws']

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ('image', 'label', 'index')
CONVERT_COMMAND = 'python -m composer_maect.data.convert SOURCE OUT'

# Keyword arguments of StreamingDataset that build_image_dataloader sets itself.
_LOADER_MANAGED_KWARGS = ('local', 'remote', 'split', 'batch_size', 'shuffle', 'shuffle_seed')


class CorruptSampleError(RuntimeError):
    """An image in a shard failed to decode. The message names the shard file and the sample."""


def _default_transform() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class ImageStreamingDataset(StreamingDataset):
    """A ``StreamingDataset`` of the converter's shards that yields one or more transformed views per image.

    Args:
        views: number of views per image. 1 yields ``{'image', 'label', 'index'}``; 2 or more yields ``'view0'``,
            ``'view1'``, ... in place of ``'image'``.
        transform: a callable from an RGB image (a PIL image, or a uint8 tensor ``[3, H, W]`` from the JPEG
            decoder) to a tensor ``[3, H, W]``, such as the pipelines of ``build_transform``, applied to every view
            with fresh random draws, or a sequence with one callable per view (such as the pair of
            ``build_transform('contrastive_aug', ...)``). None converts to a float tensor in 0..1 without resizing,
            which only batches when all images have the same size.
        augmentation_seed: seed of the random draws of the transforms. None takes ``torch.initial_seed()`` when the
            dataset is built, which is the run's seed after Composer's ``reproducibility.seed_all(seed)``.
        decoder: ``'auto'`` (JPEGs with ``torchvision.io.decode_jpeg`` into uint8 tensors, other formats with PIL)
            or ``'pil'`` (PIL images for every format, the input of the official MAE-CT pipelines). Both give the
            same pixels; the transforms' resizing and colour steps on tensors differ from those on PIL images by
            rounding.
        **streaming_kwargs: keyword arguments of ``StreamingDataset``, such as ``local``, ``remote``, ``split``,
            ``batch_size``, ``shuffle``, ``shuffle_seed``, ``predownload``, ``cache_limit``.

    The transforms of a sample draw from torch's CPU generator seeded from ``(augmentation_seed, epoch, sample id)``,
    and the generator's previous state is restored afterwards. So the views of a sample depend neither on the
    DataLoader worker that reads it nor on the samples read before it, and a run resumed mid-epoch from a checkpoint
    gets the same views as an uninterrupted run.

    Raises:
        ValueError: invalid ``views``, ``transform`` or ``decoder``, or shards without the columns image, label and
            index.
        CorruptSampleError: (when reading) an image that does not decode.
    """

    def __init__(
        self,
        *,
        views: int = 1,
        transform: Callable | Sequence[Callable] | None = None,
        augmentation_seed: int | None = None,
        decoder: str = 'auto',
        **streaming_kwargs,
    ):
        self.views = views
        self.decoder = check_decoder(decoder)
        self.transforms = self._per_view_transforms(views, transform)
        self.augmentation_seed = torch.initial_seed() if augmentation_seed is None else augmentation_seed
        self._epoch = 0
        super().__init__(**streaming_kwargs)
        self._check_columns()

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # Streaming 0.13.0 calls this in every worker at the start of an epoch's iteration. After a checkpoint load it
        # returns the resumed epoch, so the augmentation seed below follows the data position.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, sample_in_epoch

    @staticmethod
    def _per_view_transforms(views: int, transform: Callable | Sequence[Callable] | None) -> list[Callable]:
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f'views must be a positive int, got {views!r}.')
        if transform is None:
            return [_default_transform()] * views
        if callable(transform):
            return [transform] * views
        if isinstance(transform, Sequence) and all(callable(item) for item in transform):
            if len(transform) != views:
                raise ValueError(
                    f'transform has {len(transform)} pipelines but views is {views}. Give one pipeline per view or '
                    f'a single pipeline for all views.'
                )
            return list(transform)
        raise ValueError(f'transform must be a callable or a sequence of callables, got {type(transform).__name__}.')

    def _check_columns(self) -> None:
        for shard in self.shards:
            columns = getattr(shard, 'column_names', None)
            if columns is None:
                continue
            missing = [name for name in REQUIRED_COLUMNS if name not in columns]
            if missing:
                raise ValueError(
                    f'Shard {self._shard_path(shard)} has columns {list(columns)} but lacks {missing}. '
                    f'ImageStreamingDataset reads the shards that `{CONVERT_COMMAND}` writes.'
                )

    @staticmethod
    def _shard_path(shard: Any) -> str:
        return os.path.join(shard.dirname, shard.split, shard.raw_data.basename)

    def _describe_sample(self, sample_id: int) -> str:
        shard_id, shard_sample_id = self.spanner[sample_id]
        shard = self.shards[shard_id]
        description = f'sample {sample_id} (sample {shard_sample_id} of shard file {self._shard_path(shard)}'
        remote = self.streams[self.stream_per_shard[shard_id]].remote
        if remote:
            description += f', downloaded from {remote}'
        return description + ')'

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """Return the transformed views, label and index of sample ``sample_id``."""
        sample = super().get_item(sample_id, retry=retry)
        try:
            image = decode_rgb(sample['image'], self.decoder)
        except DECODE_ERRORS as err:
            raise CorruptSampleError(
                f'Failed to decode the image of {self._describe_sample(sample_id)}: {type(err).__name__}: {err}. '
                f'The shard file may be corrupt. Delete it, or the whole split, and re-run the converter '
                f'(`{CONVERT_COMMAND}`) to write it again.'
            ) from err

        item: dict[str, Any] = {}
        with sample_draws(self.augmentation_seed, self._epoch, sample_id):
            if self.views == 1:
                item['image'] = self.transforms[0](image)
            else:
                for view, transform in enumerate(self.transforms):
                    item[f'view{view}'] = transform(image)
        item['label'] = int(sample['label'])
        item['index'] = int(sample['index'])
        return item


@contextlib.contextmanager
def sample_draws(augmentation_seed: int, epoch: int, sample_id: int) -> Iterator[None]:
    """Seed torch's CPU generator for the transforms of one sample, and restore its previous state on exit.

    The seed is derived from ``(augmentation_seed, epoch, sample_id)`` with ``numpy.random.SeedSequence``. Only the
    CPU generator is seeded: ``torch.manual_seed`` would also seed an initialized CUDA generator, so with
    ``num_workers=0`` the training's random draws on the GPU would follow the samples.
    """
    seed = np.random.SeedSequence([augmentation_seed, epoch, sample_id]).generate_state(1, np.uint64)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed[0]))
        yield


def _index_path(local: str, split: str | None) -> str:
    return os.path.join(local, split or '', 'index.json')


def build_image_dataloader(
    *,
    local: str,
    remote: str | None = None,
    split: str | None = None,
    batch_size: int,
    views: int = 1,
    transform: Callable | Sequence[Callable] | None = None,
    shuffle: bool = True,
    shuffle_seed: int = 9176,
    augmentation_seed: int | None = None,
    decoder: str = 'auto',
    num_workers: int = 0,
    drop_last: bool = True,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    streaming_kwargs: dict[str, Any] | None = None,
) -> DataLoader:
    """Build a ``DataLoader`` over an ``ImageStreamingDataset``.

    Args:
        local: folder with the shards, or the cache folder that shards from ``remote`` are downloaded into. Give
            every dataset its own folder when a remote is used.
        remote: where the shards live (``s3://...``, ``gs://...`` or a local path), or None to read ``local`` only.
        split: sub-folder of ``local`` and ``remote`` with the split, such as ``'train'`` or ``'val'``.
        batch_size: samples per batch on each rank. Both the dataset and the DataLoader get it, because Streaming
            needs it to resume a run at the same sample.
        views, transform: see ``ImageStreamingDataset``.
        shuffle, shuffle_seed: Streaming's shuffle, identical on all ranks for the same seed.
        augmentation_seed, decoder: see ``ImageStreamingDataset``.
        num_workers, drop_last, persistent_workers, pin_memory, prefetch_factor: as in ``DataLoader``.
            ``persistent_workers`` and ``prefetch_factor`` apply only when ``num_workers > 0``.
        streaming_kwargs: further ``StreamingDataset`` arguments, such as ``predownload`` or ``cache_limit``.

    Raises:
        FileNotFoundError: ``remote`` is None and ``local`` has no ``index.json`` for the split.
        ShardError: ``remote`` is None and a shard file that ``index.json`` lists is missing or has another size.
        ValueError: ``streaming_kwargs`` repeats an argument of this function, or an invalid ``batch_size``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
    streaming_kwargs = dict(streaming_kwargs or {})
    repeated = sorted(set(streaming_kwargs) & set(_LOADER_MANAGED_KWARGS))
    if repeated:
        raise ValueError(f'streaming_kwargs repeats {repeated}. Pass them as arguments of build_image_dataloader.')

    if remote is None:
        index_path = _index_path(local, split)
        if not os.path.isdir(local):
            raise FileNotFoundError(
                f'Data folder {local!r} does not exist and no remote is set. Create it with `{CONVERT_COMMAND}`, '
                f'then set local to OUT and split to train or val. Or set remote to where the shards are.'
            )
        if not os.path.isfile(index_path):
            available = sorted(
                name for name in ('train', 'val') if split is None and os.path.isfile(_index_path(local, name))
            )
            hint = f' It has the splits {available}: set split to one of them.' if available else ''
            raise FileNotFoundError(
                f'No shards in {os.path.dirname(index_path)!r}: index.json not found.{hint} Shards are written by '
                f'`{CONVERT_COMMAND}`.'
            )
        check_local_shards(os.path.dirname(index_path))

    dataset = ImageStreamingDataset(
        views=views,
        transform=transform,
        local=local,
        remote=remote,
        split=split,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        augmentation_seed=augmentation_seed,
        decoder=decoder,
        **streaming_kwargs,
    )

    loader_kwargs: dict[str, Any] = {}
    if num_workers > 0:
        loader_kwargs['persistent_workers'] = persistent_workers
        if prefetch_factor is not None:
            loader_kwargs['prefetch_factor'] = prefetch_factor
    elif persistent_workers or prefetch_factor is not None:
        log.info('Ignoring persistent_workers and prefetch_factor because num_workers is 0.')
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        **loader_kwargs,
    )
