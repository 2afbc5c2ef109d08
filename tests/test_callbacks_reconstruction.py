"""Tests for the ReconstructionImages callback, inside a real Composer Trainer on CPU."""

import pathlib

import pytest
import torch
import torch.distributed
from composer import Trainer
from composer.loggers import LoggerDestination
from composer.models import ComposerClassifier
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from composer_maect.callbacks.reconstruction import ReconstructionImages
from composer_maect.models import MAEModel, create_encoder, normalize_patches, patchify

IMG = 32
PATCH = 8
PADDING = 2  # make_grid's border, in pixels
RUN_NAME = 'recon-test'


class RecordingDestination(LoggerDestination):
    """Logger destination that records the images and files it receives."""

    def __init__(self):
        self.images = []
        self.uploads = []

    def log_images(
        self, images, name='Images', channels_last=False, step=None, masks=None, mask_class_labels=None, use_table=True
    ):
        self.images.append({'images': images, 'name': name, 'step': step})

    def can_upload_files(self):
        return True

    def upload_file(self, state, remote_file_name, file_path, *, overwrite):
        self.uploads.append({'remote_file_name': remote_file_name, 'file_path': pathlib.Path(file_path)})


class ImageDataset(Dataset):
    """In-memory samples in the data part's format: {'image', 'label', 'index'} or two views."""

    def __init__(self, num_samples, views=1, channels=3):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(num_samples, views, channels, IMG, IMG, generator=generator)
        self.views = views

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        sample = {'label': index % 2, 'index': index}
        if self.views == 1:
            sample['image'] = self.images[index, 0]
        else:
            for view in range(self.views):
                sample[f'view{view}'] = self.images[index, view]
        return sample


def tiny_mae(in_chans=3, **kwargs):
    torch.manual_seed(0)
    encoder = create_encoder(
        'vit_tiny_patch16', img_size=IMG, patch_size=PATCH, in_chans=in_chans, embed_dim=32, depth=1, num_heads=2
    )
    return MAEModel(encoder, decoder_dim=16, decoder_depth=1, decoder_num_heads=2, **kwargs)


def fit(model, callback, dataset, max_duration='2ba', destination=None, batch_size=4):
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(dataset, batch_size=batch_size),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        max_duration=max_duration,
        device='cpu',
        precision='fp32',
        callbacks=[callback],
        loggers=[destination] if destination else [],
        run_name=RUN_NAME,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    return trainer


def grid_size(num_images):
    """(width, height) of a 3-row grid of num_images columns of IMG x IMG images."""
    return num_images * (IMG + PADDING) + PADDING, 3 * (IMG + PADDING) + PADDING


def grid_cell(grid, row, column):
    """Image at (row, column) of a make_grid output [3, H, W]."""
    top = PADDING + row * (IMG + PADDING)
    left = PADDING + column * (IMG + PADDING)
    return grid[:, top : top + IMG, left : left + IMG]


def test_saves_png_every_batch(tmp_path):
    destination = RecordingDestination()
    callback = ReconstructionImages(interval='1ba', num_images=3, folder=str(tmp_path / '{run_name}' / 'recon'))
    fit(tiny_mae(), callback, ImageDataset(8), destination=destination)

    folder = tmp_path / RUN_NAME / 'recon'
    files = sorted(path.name for path in folder.iterdir())
    assert files == ['reconstruction-ep0-ba1.png', 'reconstruction-ep0-ba2.png']
    with Image.open(folder / files[0]) as image:
        assert image.size == grid_size(3)
        assert image.mode == 'RGB'

    assert [record['step'] for record in destination.images] == [1, 2]
    assert all(record['name'] == 'maect/reconstructions' for record in destination.images)
    assert destination.images[0]['images'].shape == (3, grid_size(3)[1], grid_size(3)[0])
    assert [upload['remote_file_name'] for upload in destination.uploads] == [
        f'{RUN_NAME}/reconstructions/reconstruction-ep0-ba1.png',
        f'{RUN_NAME}/reconstructions/reconstruction-ep0-ba2.png',
    ]
    assert destination.uploads[1]['file_path'] == folder / 'reconstruction-ep0-ba2.png'


@pytest.mark.parametrize(
    ('max_duration', 'expected'),
    [
        ('2ba', ['reconstruction-ep0-ba2.png']),  # the epoch never ends: saved at FIT_END only
        ('1ep', ['reconstruction-ep1-ba3.png']),  # saved at EPOCH_END, and FIT_END does not save it again
    ],
)
def test_epoch_interval(tmp_path, max_duration, expected):
    callback = ReconstructionImages(interval='1ep', num_images=2, folder=str(tmp_path))
    fit(tiny_mae(), callback, ImageDataset(12), max_duration=max_duration)
    assert sorted(path.name for path in tmp_path.iterdir()) == expected


def test_int_interval_means_epochs(tmp_path):
    callback = ReconstructionImages(interval=1, num_images=2, folder=str(tmp_path), filename='e{epoch}.png')
    fit(tiny_mae(), callback, ImageDataset(8), max_duration='2ep')
    assert sorted(path.name for path in tmp_path.iterdir()) == ['e1.png', 'e2.png']


def test_two_view_batches(tmp_path):
    destination = RecordingDestination()
    callback = ReconstructionImages(interval='2ba', num_images=8, folder=str(tmp_path))
    fit(tiny_mae(), callback, ImageDataset(8, views=2), destination=destination)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    with Image.open(files[0]) as image:
        assert image.size == grid_size(4)  # the batch has 4 images per view, fewer than num_images
    assert len(destination.images) == 1


def test_single_channel_images(tmp_path):
    callback = ReconstructionImages(interval='1ba', num_images=2, folder=str(tmp_path), mean=0.5, std=0.25)
    fit(tiny_mae(in_chans=1), callback, ImageDataset(4, channels=1), max_duration='1ba')
    (path,) = tmp_path.iterdir()
    with Image.open(path) as image:
        assert image.size == grid_size(2)


def test_finds_model_through_ddp(tmp_path, single_rank_group):
    model = tiny_mae()
    callback = ReconstructionImages(interval='1ba', num_images=2, folder=str(tmp_path / 'out'))
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(ImageDataset(4), batch_size=2),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        max_duration='1ba',
        device='cpu',
        precision='fp32',
        callbacks=[callback],
        run_name=RUN_NAME,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.state.model = DistributedDataParallel(trainer.state.model)
    trainer.fit()
    assert isinstance(trainer.state.model, DistributedDataParallel)
    assert [path.name for path in (tmp_path / 'out').iterdir()] == ['reconstruction-ep0-ba1.png']


def test_rejects_other_models(tmp_path):
    model = ComposerClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), num_classes=2)
    dataset = torch.utils.data.TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.int64))
    callback = ReconstructionImages(folder=str(tmp_path))
    with pytest.raises(TypeError, match='needs an MAEModel'):
        fit(model, callback, dataset)


def test_rejects_batch_without_images(tmp_path):
    class PixelsDataset(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return {'pixels': torch.zeros(3, IMG, IMG)}

    with pytest.raises(KeyError, match="'image' or 'view0'"):
        fit(tiny_mae(), ReconstructionImages(folder=str(tmp_path)), PixelsDataset())


def test_build_grid_restores_modes_and_rng():
    model = tiny_mae()
    model.train()
    model.encoder.eval()  # e.g. a frozen encoder
    images = torch.randn(2, 3, IMG, IMG)
    rng_before = torch.get_rng_state()

    grid = ReconstructionImages(num_images=2).build_grid(model, images)

    assert grid.shape == (3, grid_size(2)[1], grid_size(2)[0])
    assert model.training
    assert model.decoder.training
    assert not model.encoder.training
    assert not model.encoder.vit.blocks[0].training
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_build_grid_pastes_visible_patches():
    model = tiny_mae()
    images = torch.rand(3, 3, IMG, IMG)
    grid = ReconstructionImages(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).build_grid(model, images)

    for column in range(3):
        inputs = grid_cell(grid, 0, column)
        masked = grid_cell(grid, 1, column)
        reconstruction = grid_cell(grid, 2, column)
        torch.testing.assert_close(inputs, images[column])
        # Masked patches are grey in the middle row; the other patches are the input in both lower rows.
        grey = (patchify(masked[None], PATCH) == 0.5).all(dim=-1)[0]
        assert grey.sum() == 12  # 16 patches at ratio 0.75
        visible = ~grey
        torch.testing.assert_close(patchify(masked[None], PATCH)[0][visible], patchify(inputs[None], PATCH)[0][visible])
        torch.testing.assert_close(
            patchify(reconstruction[None], PATCH)[0][visible], patchify(inputs[None], PATCH)[0][visible]
        )


class OracleMAE(MAEModel):
    """MAEModel whose prediction is the exact training target, to check how the callback maps it back to pixels."""

    def forward(self, batch):
        outputs = super().forward(batch)
        target = outputs['target']
        outputs['pred'] = normalize_patches(target)[0] if self.norm_pix_loss else target.clone()
        return outputs


@pytest.mark.parametrize('norm_pix_loss', [True, False])
def test_build_grid_unnormalizes_prediction(norm_pix_loss):
    torch.manual_seed(0)
    encoder = create_encoder('vit_tiny_patch16', img_size=IMG, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2)
    model = OracleMAE(encoder, decoder_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix_loss)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.rand(2, 3, IMG, IMG) * 0.8 + 0.1
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    grid = ReconstructionImages(mean=mean, std=std).build_grid(model, images)

    for column in range(2):
        torch.testing.assert_close(grid_cell(grid, 0, column), pixels[column], atol=1e-5, rtol=0)
        torch.testing.assert_close(grid_cell(grid, 2, column), pixels[column], atol=1e-4, rtol=0)


def test_build_grid_channel_mismatch():
    model = tiny_mae(in_chans=1)
    with pytest.raises(ValueError, match='one value per channel'):
        ReconstructionImages(mean=(0.1, 0.2), std=(1.0, 1.0)).build_grid(model, torch.randn(1, 1, IMG, IMG))


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'interval': '10sp'}, 'batches or epochs'),
        ({'interval': '0ba'}, 'positive'),
        ({'num_images': 0}, 'num_images'),
        ({'mean': (0.5,), 'std': (0.5, 0.5)}, 'equal length'),
        ({'mean': (), 'std': ()}, 'non-empty'),
        ({'mean': (0.5,), 'std': (0.0,)}, 'positive'),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReconstructionImages(**kwargs)
