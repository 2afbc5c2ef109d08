"""ImageStreamingDataset and build_image_dataloader on shards written by the converter."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter

from composer_maect.data.convert import COLUMNS, convert
from composer_maect.data.dataset import (
    CorruptSampleError,
    ImageStreamingDataset,
    build_image_dataloader,
    decode_image,
)
from composer_maect.data.transforms import build_transform

# One image per class folder; the converter sorts the classes by name.
CLASSES = ['cmyk', 'grey', 'grey16', 'palette', 'rgb', 'rgba']


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


@pytest.fixture
def mixed_shards(tmp_path) -> Path:
    """Shards with one image of each colour mode: CMYK JPEG, grey, 16-bit grey, palette, RGB and RGBA PNG."""
    root = tmp_path / 'images'
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.new('CMYK', (20, 14), (0, 255, 255, 0)).save(root / 'cmyk' / 'a.jpg')
    Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint8)).save(root / 'grey' / 'a.png')
    Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16)).save(root / 'grey16' / 'a.png')
    Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).convert('P').save(root / 'palette' / 'a.png')
    Image.fromarray(rng.integers(0, 256, (18, 24, 3), dtype=np.uint8)).save(root / 'rgb' / 'a.jpg')
    Image.fromarray(rng.integers(0, 256, (15, 15, 4), dtype=np.uint8)).save(root / 'rgba' / 'a.png')
    out = tmp_path / 'shards'
    convert(str(root), str(out), val_fraction=None, progress=False)
    return out


def _by_class(dataset: ImageStreamingDataset) -> dict[str, dict]:
    items = [dataset[position] for position in range(dataset.num_samples)]
    return {CLASSES[item['label']]: item for item in items}


def test_single_view_keys_shapes_dtypes(mixed_shards):
    dataset = ImageStreamingDataset(
        local=str(mixed_shards), split='train', transform=build_transform('eval', img_size=16), batch_size=2
    )
    assert dataset.num_samples == len(CLASSES)
    items = [dataset[position] for position in range(dataset.num_samples)]
    for item in items:
        assert set(item) == {'image', 'label', 'index'}
        assert item['image'].shape == (3, 16, 16)
        assert item['image'].dtype == torch.float32
        assert isinstance(item['label'], int)
        assert isinstance(item['index'], int)
    assert sorted(item['index'] for item in items) == list(range(len(CLASSES)))
    assert sorted(item['label'] for item in items) == list(range(len(CLASSES)))


def test_colour_modes_become_rgb(mixed_shards):
    items = _by_class(ImageStreamingDataset(local=str(mixed_shards), split='train'))

    for name, item in items.items():
        assert item['image'].shape[0] == 3, name
        assert 0.0 <= float(item['image'].min()) <= float(item['image'].max()) <= 1.0, name
    grey = items['grey']['image']
    assert grey.shape == (3, 12, 16)
    torch.testing.assert_close(grey[0], grey[1])
    torch.testing.assert_close(grey[0], grey[2])
    # 16-bit grey keeps its top 8 bits: 40000 >> 8 = 156.
    torch.testing.assert_close(items['grey16']['image'], torch.full((3, 10, 10), 156 / 255))
    red, green, blue = items['cmyk']['image'].mean(dim=(1, 2))
    assert red > 0.8
    assert green < 0.2
    assert blue < 0.2


def test_decode_image_modes():
    assert decode_image(_png_bytes(Image.new('L', (4, 3), 7))).mode == 'RGB'
    assert decode_image(_png_bytes(Image.new('LA', (4, 3), (7, 9)))).mode == 'RGB'
    assert decode_image(_png_bytes(Image.new('1', (4, 3), 1))).getpixel((0, 0)) == (255, 255, 255)


def test_two_views_with_pair(mixed_shards):
    dataset = ImageStreamingDataset(
        local=str(mixed_shards),
        split='train',
        views=2,
        transform=build_transform('contrastive_aug', img_size=16),
    )
    for position in range(dataset.num_samples):
        item = dataset[position]
        assert set(item) == {'view0', 'view1', 'label', 'index'}
        assert item['view0'].shape == (3, 16, 16)
        assert item['view1'].shape == (3, 16, 16)
        assert item['view0'].dtype == torch.float32


def test_two_views_one_pipeline_draw_independently(mixed_shards):
    torch.manual_seed(0)
    dataset = ImageStreamingDataset(
        local=str(mixed_shards), split='train', views=2, transform=build_transform('mae', img_size=16)
    )
    rgb = _by_class(dataset)['rgb']
    assert not torch.equal(rgb['view0'], rgb['view1'])


def test_grey_image_two_views(mixed_shards):
    dataset = ImageStreamingDataset(
        local=str(mixed_shards), split='train', views=2, transform=build_transform('contrastive', img_size=8)
    )
    grey = _by_class(dataset)['grey']
    assert grey['view0'].shape == (3, 8, 8)
    assert grey['view1'].shape == (3, 8, 8)


def test_corrupt_sample_names_shard_and_index(tmp_path):
    out = tmp_path / 'corrupt'
    with MDSWriter(columns=COLUMNS, out=str(out)) as writer:
        writer.write({'image': _png_bytes(Image.new('RGB', (4, 4))), 'label': 0, 'index': 0})
        writer.write({'image': b'\x89PNG garbage, not an image', 'label': 1, 'index': 1})
    dataset = ImageStreamingDataset(local=str(out))

    assert dataset[0]['image'].shape == (3, 4, 4)
    with pytest.raises(CorruptSampleError) as raised:
        dataset[1]
    message = str(raised.value)
    assert str(out / 'shard.00000.mds') in message
    assert 'sample 1' in message
    assert 'may be corrupt' in message
    assert 'python -m composer_maect.data.convert' in message


def test_shards_without_columns_rejected(tmp_path):
    out = tmp_path / 'other'
    with MDSWriter(columns={'x': 'bytes', 'y': 'int'}, out=str(out)) as writer:
        writer.write({'x': b'abc', 'y': 0})
    with pytest.raises(ValueError, match=r"lacks \['image', 'label', 'index'\]"):
        ImageStreamingDataset(local=str(out))


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'views': 0}, 'views must be a positive int'),
        ({'views': 1, 'transform': (lambda image: image, lambda image: image)}, 'one pipeline per view'),
        ({'views': 2, 'transform': 'eval'}, 'callable'),
    ],
)
def test_invalid_views_or_transform(mixed_shards, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageStreamingDataset(local=str(mixed_shards), split='train', **kwargs)


def test_dataloader_batches(mixed_shards):
    loader = build_image_dataloader(
        local=str(mixed_shards),
        split='train',
        batch_size=4,
        transform=build_transform('eval', img_size=16),
        persistent_workers=True,  # Not passed on with num_workers 0, where DataLoader would reject it.
        prefetch_factor=2,
    )
    assert loader.batch_size == 4
    assert loader.dataset.batch_size == 4
    batches = list(loader)
    assert len(batches) == 1  # 6 samples, drop_last
    batch = batches[0]
    assert set(batch) == {'image', 'label', 'index'}
    assert batch['image'].shape == (4, 3, 16, 16)
    assert batch['image'].dtype == torch.float32
    assert batch['label'].dtype == torch.int64
    assert batch['index'].dtype == torch.int64
    assert batch['label'].shape == (4,)


def test_dataloader_two_views_with_workers(mixed_shards):
    loader = build_image_dataloader(
        local=str(mixed_shards),
        split='train',
        batch_size=2,
        views=2,
        transform=build_transform('contrastive_aug', img_size=8),
        num_workers=2,
        prefetch_factor=1,
        drop_last=False,
        shuffle=False,
    )
    batches = list(loader)
    indices = sorted(int(index) for batch in batches for index in batch['index'])
    assert indices == list(range(len(CLASSES)))
    assert batches[0]['view0'].shape == (2, 3, 8, 8)
    assert batches[0]['view1'].shape == (2, 3, 8, 8)


def test_dataloader_from_local_remote(mixed_shards, tmp_path):
    cache = tmp_path / 'cache'
    loader = build_image_dataloader(
        local=str(cache),
        remote=str(mixed_shards),
        split='train',
        batch_size=3,
        transform=build_transform('eval', img_size=8),
    )
    assert sum(len(batch['label']) for batch in loader) == len(CLASSES)
    assert (cache / 'train' / 'shard.00000.mds').is_file()


def test_dataloader_missing_folder(tmp_path):
    missing = tmp_path / 'nowhere'
    with pytest.raises(FileNotFoundError) as raised:
        build_image_dataloader(local=str(missing), split='train', batch_size=2)
    assert str(missing) in str(raised.value)
    assert 'python -m composer_maect.data.convert SOURCE OUT' in str(raised.value)


def test_dataloader_missing_split_hint(mixed_shards):
    with pytest.raises(FileNotFoundError, match=r"splits \['train'\]: set split"):
        build_image_dataloader(local=str(mixed_shards), batch_size=2)
    with pytest.raises(FileNotFoundError, match=r'index\.json not found'):
        build_image_dataloader(local=str(mixed_shards), split='val', batch_size=2)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'batch_size': 0}, 'batch_size'),
        ({'batch_size': 2, 'streaming_kwargs': {'shuffle': False}}, r"repeats \['shuffle'\]"),
    ],
)
def test_dataloader_invalid_arguments(mixed_shards, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_image_dataloader(local=str(mixed_shards), split='train', **kwargs)


def test_views_independent_of_workers(mixed_shards):
    """A sample's views depend on the augmentation seed, the epoch and the sample, not on the worker that reads it."""
    transform = build_transform('contrastive', img_size=8)

    def views_by_index(num_workers: int, seed: int, epochs: int = 1) -> list[dict[int, torch.Tensor]]:
        loader = build_image_dataloader(
            local=str(mixed_shards),
            split='train',
            batch_size=2,
            views=2,
            transform=transform,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
            augmentation_seed=seed,
        )
        per_epoch = []
        for _ in range(epochs):
            views = {}
            for batch in loader:
                for row, index in enumerate(batch['index'].tolist()):
                    views[index] = torch.cat([batch['view0'][row], batch['view1'][row]])
            per_epoch.append(views)
        return per_epoch

    first_epoch, second_epoch = views_by_index(0, seed=5, epochs=2)
    (with_workers,) = views_by_index(2, seed=5)
    (other_seed,) = views_by_index(0, seed=6)
    assert sorted(first_epoch) == list(range(len(CLASSES)))
    assert sorted(with_workers) == sorted(first_epoch)
    for index, views in first_epoch.items():
        assert torch.equal(with_workers[index], views), index
        if torch.equal(views.amax(dim=(1, 2)), views.amin(dim=(1, 2))):
            continue  # Every crop of a single-colour image (the CMYK and 16-bit grey ones) is the same.
        assert not torch.equal(second_epoch[index], views), index
        assert not torch.equal(other_seed[index], views), index


def test_sample_seeds_no_cuda_generator(mixed_shards, monkeypatch):
    """The transforms' seeding touches only the CPU generator, so the training's draws on a GPU do not follow it."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, 'manual_seed', lambda seed: calls.append(seed))
    dataset = ImageStreamingDataset(
        local=str(mixed_shards), split='train', views=2, transform=build_transform('contrastive', img_size=8)
    )
    torch.manual_seed(123)
    calls.clear()
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    calls.clear()

    dataset[0]

    assert calls == []
    assert torch.equal(torch.rand(1), expected_next), 'the CPU generator is restored after the sample'
