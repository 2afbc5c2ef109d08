"""Throughput, MFU, data-loading and memory benchmarks of MAE-CT training steps against plain PyTorch references.

Run ``python -m composer_maect.benchmark --help`` for the options. Rows:

- ``tuning``: a contrastive tuning step in a ``composer.Trainer`` (``ViTEncoderModel`` with ``ContrastiveTuning``,
  ``LayerwiseUnfreezing`` of the lower half and the package's ``EMA``). The reference is a plain loop over the same
  timm ViT with the same frozen blocks: two views, a trivial loss (mean of the pooled features) and an AdamW step.
  ``--compile`` compiles the encoder blocks of both sides with ``torch.compile``.
- ``mae``: an ``MAEModel`` step in a Trainer against a plain loop over the same model's forward, loss and backward.
- ``data``: two-view samples/s per worker from MDS shards of JPEGs (cut from real photographs) with each of the
  dataset's decoders, against torchvision's ``ImageFolder`` with the same transform on the same files.
- ``memory``: peak memory of the tuning step, with and without activation checkpointing, one subprocess each.
- ``gpu``: ViT-L/16 and ViT-H/14 tuning steps in bf16 on one CUDA device; skipped when CUDA is absent.

The Trainer and the reference run in alternating blocks of steps (by default one step per block), so that machine
noise hits both alike, and each reports the median of its per-block step times. A Trainer step is timed from
``AFTER_DATALOADER`` to ``BATCH_END``, which includes Composer's copy of the batch to the device. The reference copies
one batch from host memory each step, and the ``data`` row measures loading.
MFU is the model's FLOPs per second (``flops_per_batch``) over the rate of a large ``torch.matmul`` measured in the same
process at the same precision and thread count, before and after the model rows (the faster of the two).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ['main', 'measure_matmul_flops']

log = logging.getLogger(__name__)

ROW_NAMES = ('tuning', 'mae', 'data', 'memory', 'gpu')
DEFAULT_ROWS = 'tuning,mae,data,memory,gpu'
PRECISIONS = {'fp32': ('fp32', None), 'bf16': ('amp_bf16', torch.bfloat16)}
# ViT-L/16 and ViT-H/14 at 224 pixels.
GPU_MODELS = ('vit_large_patch16', 'vit_huge_patch14')
GPU_TIME_BUDGET_S = 300.0
DATA_NUM_WORKERS = (0, 1)
DATA_IMAGE_SIZE = 500  # longer side of the data row's JPEGs, as in most ImageNet training images
# Passes over the JPEGs per loader in the data row.
DATA_PASSES = 3
DATA_AUGMENTATION_SEED = 0


# ---------------------------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------------------------


def _synchronize(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def measure_matmul_flops(device: str, dtype: torch.dtype, size: int = 3072, repeats: int = 5) -> float:
    """Return the FLOP/s of the fastest of ``repeats`` ``[size, size] @ [size, size]`` ``torch.matmul`` calls.

    The fastest call, not the median, estimates the rate the machine can reach, because background load only slows
    calls down. FLOPs count 2 per multiply-add.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def _clock() -> tuple[float, float]:
    """Return ``(wall seconds, CPU seconds of this process over all its threads)``."""
    return time.perf_counter(), time.process_time()


def _elapsed(start: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def _block_sizes(steps: int, blocks: int) -> list[int]:
    """Split ``steps`` measured steps into ``blocks`` nearly equal blocks (at least one step each)."""
    blocks = max(1, min(blocks, steps))
    return [steps // blocks + (1 if i < steps % blocks else 0) for i in range(blocks)]


BlockRunner = Callable[[int], tuple[float, float]]


def _interleave(
    run_trainer_block: BlockRunner, run_reference_block: BlockRunner, args: argparse.Namespace
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Run warmup steps, then alternating blocks.

    Each runner takes a number of steps and returns their ``(wall, CPU)`` seconds. Returns the ``(wall, CPU)``
    seconds per step of every block, for the Trainer and for the reference.
    """
    if args.warmup > 0:
        run_trainer_block(args.warmup)
        run_reference_block(args.warmup)
    trainer_times, reference_times = [], []
    for index, size in enumerate(_block_sizes(args.steps, args.blocks)):
        # Alternate which side goes first, so neither always runs on a machine warmed by the other.
        order = [('trainer', run_trainer_block), ('reference', run_reference_block)]
        if index % 2:
            order.reverse()
        for name, run in order:
            wall, cpu = run(size)
            seconds = (wall / size, cpu / size)
            (trainer_times if name == 'trainer' else reference_times).append(seconds)
    return trainer_times, reference_times


class _StepTimer:
    """A Composer callback that sums the seconds from ``AFTER_DATALOADER`` to ``BATCH_END`` of every batch."""

    def __init__(self, device: str) -> None:
        from composer.core import Callback

        device_name = device

        class _Callback(Callback):
            def __init__(self) -> None:
                self.total = (0.0, 0.0)
                self._start = (0.0, 0.0)

            def after_dataloader(self, state, logger) -> None:
                _synchronize(device_name)
                self._start = _clock()

            def batch_end(self, state, logger) -> None:
                _synchronize(device_name)
                wall, cpu = _elapsed(self._start)
                self.total = (self.total[0] + wall, self.total[1] + cpu)

        self.callback = _Callback()

    def run(self, trainer: Any, steps: int) -> tuple[float, float]:
        """Train ``steps`` batches and return their total ``(wall, CPU)`` seconds."""
        self.callback.total = (0.0, 0.0)
        trainer.fit(duration=f'{steps}ba')
        return self.callback.total


# ---------------------------------------------------------------------------------------------------------------------
# In-memory batches
# ---------------------------------------------------------------------------------------------------------------------


class _RepeatedImages(Dataset):
    """``length`` samples cycling over a small pool of random images, as one or two views ``[3, H, W]``."""

    def __init__(self, length: int, img_size: int, views: int, pool: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.pool = torch.randn(pool, views, 3, img_size, img_size, generator=generator)
        self.length = length
        self.views = views

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.pool[index % len(self.pool)]
        if self.views == 1:
            return {'image': sample[0]}
        return {f'view{view}': sample[view] for view in range(self.views)}


def _make_batch(batch_size: int, img_size: int, views: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (batch_size, 3, img_size, img_size)
    if views == 1:
        return {'image': torch.randn(shape, generator=generator).to(device)}
    return {f'view{view}': torch.randn(shape, generator=generator).to(device) for view in range(views)}


def _trainer_loader(args: argparse.Namespace, views: int) -> DataLoader:
    total_steps = args.warmup + args.steps + 1
    dataset = _RepeatedImages(args.batch * total_steps, args.img_size, views)
    pin_memory = args.device == 'cuda'
    return DataLoader(dataset, batch_size=args.batch, shuffle=False, drop_last=True, pin_memory=pin_memory)


def _host_batch(args: argparse.Namespace, views: int) -> dict[str, torch.Tensor]:
    """Return a reference batch in host memory, pinned on CUDA like the Trainer's loader batches."""
    batch = _make_batch(args.batch, args.img_size, views, device='cpu')
    if args.device == 'cuda':
        batch = {key: value.pin_memory() for key, value in batch.items()}
    return batch


def _to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    # Composer copies every batch to the device inside the timed step, so the reference copies its batch too.
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def _create_vit(args: argparse.Namespace, model: str | None = None) -> Any:
    from composer_maect.models.vit import compile_encoder_blocks, create_encoder

    kwargs: dict[str, Any] = {}
    if args.depth is not None:
        kwargs['depth'] = args.depth
    torch.manual_seed(0)
    vit = create_encoder(model or args.model, img_size=args.img_size, patch_size=args.patch_size, **kwargs)
    if args.compile:
        compile_encoder_blocks(vit)
    return vit


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    from composer_maect.optim import build_adamw

    return build_adamw(model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)


def _trainer_options(args: argparse.Namespace) -> dict[str, Any]:
    """Return the Trainer arguments that every benchmark Trainer shares: device, precision, seed, no console output."""
    return {
        'device': 'gpu' if args.device == 'cuda' else 'cpu',
        'precision': PRECISIONS[args.precision][0],
        'progress_bar': False,
        'log_to_console': False,
        'seed': 17,
    }


def _build_tuning_trainer(
    args: argparse.Namespace, model_name: str | None, callbacks: list, grad_checkpointing: bool = False
) -> tuple[Any, Any]:
    """Return ``(trainer, model)`` for the MAE-CT tuning step with in-memory two-view batches."""
    from composer import Trainer

    from composer_maect.algorithms import EMA, ContrastiveTuning, LayerwiseUnfreezing
    from composer_maect.models.encoder_model import ViTEncoderModel

    vit = _create_vit(args, model_name)
    vit.set_grad_checkpointing(grad_checkpointing)
    model = ViTEncoderModel(vit)
    algorithms = [
        ContrastiveTuning(queue_size=args.queue_size, topk=20, target_momentum=0.99),
        LayerwiseUnfreezing(num_frozen_blocks=len(vit.blocks) // 2),
        # Composer 0.32.1's EMA, and so this subclass, reads self.half_life before setting it unless update_interval
        # is given.
        EMA(half_life=None, smoothing=0.9999, update_interval='1ba'),
    ]
    trainer = Trainer(
        model=model,
        optimizers=_adamw(model),
        algorithms=algorithms,
        callbacks=callbacks,
        train_dataloader=_trainer_loader(args, views=2),
        **_trainer_options(args),
    )
    return trainer, model


def _autocast(args: argparse.Namespace) -> Any:
    dtype = PRECISIONS[args.precision][1]
    return torch.autocast(args.device, dtype=dtype, enabled=dtype is not None)


def _plain_loop(
    args: argparse.Namespace,
    host_batch: dict[str, torch.Tensor],
    compute_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> BlockRunner:
    """Return a function that runs ``n`` plain training steps and returns their total ``(wall, CPU)`` seconds.

    Each step copies ``host_batch`` to the device, computes ``compute_loss(batch)`` under autocast, runs the backward
    pass and the optimizer step.
    """

    def run(steps: int) -> tuple[float, float]:
        _synchronize(args.device)
        start = _clock()
        for _ in range(steps):
            batch = _to_device(host_batch, args.device)
            with _autocast(args):
                loss = compute_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _synchronize(args.device)
        return _elapsed(start)

    return run


def _reference_tuning_step(args: argparse.Namespace, model_name: str | None) -> BlockRunner:
    """Return the tuning row's reference runner: plain steps of the ViT with the lower half of its blocks frozen."""
    from composer_maect.algorithms.layerwise_unfreezing import freeze_lower_layers

    vit = _create_vit(args, model_name).to(args.device)
    freeze_lower_layers(vit, len(vit.blocks) // 2)
    optimizer = _adamw(vit)
    host_batch = _host_batch(args, views=2)

    def class_token_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = vit.forward_features(torch.cat([batch['view0'], batch['view1']]))  # [2B, 1 + N, D]
        return tokens[:, 0].float().mean()

    return _plain_loop(args, host_batch, class_token_loss, optimizer)


def _throughput_row(
    name: str,
    args: argparse.Namespace,
    trainer_times: list[tuple[float, float]],
    reference_times: list[tuple[float, float]],
    flops_per_batch: int,
    matmul_flops: float,
    config: dict[str, Any],
) -> dict[str, Any]:
    trainer_seconds = statistics.median(wall for wall, _ in trainer_times)
    reference_seconds = statistics.median(wall for wall, _ in reference_times)
    trainer_cpu = statistics.median(cpu for _, cpu in trainer_times)
    reference_cpu = statistics.median(cpu for _, cpu in reference_times)
    return {
        'row': name,
        **config,
        'compile': args.compile,
        'images_per_s': args.batch / trainer_seconds,
        'reference_images_per_s': args.batch / reference_seconds,
        'overhead_ratio': trainer_seconds / reference_seconds - 1.0,
        'mfu': flops_per_batch / trainer_seconds / matmul_flops,
        'reference_mfu': flops_per_batch / reference_seconds / matmul_flops,
        'flops_per_batch': flops_per_batch,
        'matmul_flops_per_s': matmul_flops,
        # CPU seconds of the whole process, which other processes on the machine slow down less than wall time.
        'cpu_overhead_ratio': trainer_cpu / reference_cpu - 1.0,
        'step_seconds': [wall for wall, _ in trainer_times],
        'reference_step_seconds': [wall for wall, _ in reference_times],
        'step_cpu_seconds': [cpu for _, cpu in trainer_times],
        'reference_step_cpu_seconds': [cpu for _, cpu in reference_times],
    }


def _set_mfu(row: dict[str, Any], matmul_flops: float) -> None:
    """Recompute the MFU of a ``tuning`` or ``mae`` row against the matmul rate ``matmul_flops``."""
    row['matmul_flops_per_s'] = matmul_flops
    for key, rate in (('mfu', 'images_per_s'), ('reference_mfu', 'reference_images_per_s')):
        row[key] = row['flops_per_batch'] * row[rate] / row['batch'] / matmul_flops


# (component, file name, function name) of the functions whose cumulative time --profile reports. Entries nest: the
# whole step contains the next rows up to the AdamW update, and the head forward includes the target projector.
PROFILED_FUNCTIONS = (
    ('whole Trainer step', 'trainer.py', '_train_batch'),
    ('encoder forward, 2 views', 'vision_transformer.py', 'forward_features'),
    ('NNCLR head forward, 2 views', 'nnclr_head.py', 'forward'),
    ('queue lookup, 2 views', 'queue.py', 'find_nn'),
    ('NNCLR loss', 'losses.py', 'nnclr_loss'),
    ('neighbour accuracy', 'queue.py', 'nn_accuracy'),
    ('enqueue', 'queue.py', 'enqueue'),
    ('backward', 'graph.py', '_engine_run_backward'),
    ('AdamW update', 'adam.py', 'adam'),
    ('BATCH_END of ContrastiveTuning', 'contrastive_tuning.py', '_after_step'),
    ('target projector EMA', 'nnclr_head.py', 'update_target'),
    ('encoder and head EMA', 'ema.py', '_update'),
)


def _profile_components(run: Callable[[], Any]) -> dict[str, float]:
    """Run ``run`` under cProfile and return the cumulative seconds of each ``PROFILED_FUNCTIONS`` entry it called."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive calls, total, cumulative, ...)}
    seconds = {}
    for component, file_name, function in PROFILED_FUNCTIONS:
        matches = [
            entry[3]
            for (path, _, name), entry in stats.items()
            if name == function and os.path.basename(path) == file_name
        ]
        if matches:
            seconds[component] = sum(matches)
    return seconds


def run_tuning(args: argparse.Namespace, matmul_flops: float, model_name: str | None = None) -> dict[str, Any]:
    """Measure the MAE-CT tuning step in a Trainer against the plain reference loop."""
    timer = _StepTimer(args.device)
    trainer, model = _build_tuning_trainer(args, model_name, [timer.callback])
    reference = _reference_tuning_step(args, model_name)
    trainer_times, reference_times = _interleave(lambda n: timer.run(trainer, n), reference, args)
    profile = None
    if args.profile:
        profile = {
            'trainer': _profile_components(lambda: timer.run(trainer, 1)),
            'reference': _profile_components(lambda: reference(1)),
        }
    flops = model.flops_per_batch(_make_batch(args.batch, args.img_size, views=2, device='cpu'))
    trainer.close()
    config = {'model': model_name or args.model, 'img_size': args.img_size, 'batch': args.batch}
    config['queue_size'] = args.queue_size
    row = _throughput_row('tuning', args, trainer_times, reference_times, flops, matmul_flops, config)
    if profile is not None:
        row['profile_seconds'] = profile
    return row


def run_mae(args: argparse.Namespace, matmul_flops: float) -> dict[str, Any]:
    """Measure an MAEModel step in a Trainer against a plain loop over the same model."""
    from composer import Trainer

    from composer_maect.models.mae import MAEModel

    model = MAEModel(_create_vit(args))
    timer = _StepTimer(args.device)
    trainer = Trainer(
        model=model,
        optimizers=_adamw(model),
        callbacks=[timer.callback],
        train_dataloader=_trainer_loader(args, views=1),
        **_trainer_options(args),
    )
    # The reference drives the very model the Trainer holds, with its own optimizer state.
    reference_optimizer = _adamw(model)
    host_batch = _host_batch(args, views=1)

    run_reference = _plain_loop(args, host_batch, lambda batch: model.loss(model(batch), batch), reference_optimizer)
    trainer_times, reference_times = _interleave(lambda n: timer.run(trainer, n), run_reference, args)
    flops = model.flops_per_batch(host_batch)
    trainer.close()
    config = {'model': args.model, 'img_size': args.img_size, 'batch': args.batch, 'mask_ratio': model.mask_ratio}
    return _throughput_row('mae', args, trainer_times, reference_times, flops, matmul_flops, config)


# ---------------------------------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------------------------------


def write_photo_jpegs(root: str, num_images: int) -> None:
    """Write ``num_images`` JPEGs cut from the two photographs that scikit-learn ships, as ``root/<photo>/<i>.jpg``.

    Each image is a crop at a random place, size (a third to all of the photo's height) and aspect ratio (3/4 to
    4/3), possibly mirrored. It is resized to 500 pixels on the longer side, typical of ImageNet, and saved at
    quality 90. So the decoder works on real photographic content at the size of an ImageNet training image.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()  # china.jpg and flower.jpg, 427 x 640 pixels each
    rng = np.random.default_rng(0)
    for index in range(num_images):
        label = index % len(photos.images)
        photo = photos.images[label]
        height, width = photo.shape[:2]
        crop_height = int(rng.integers(height // 3, height + 1))
        crop_width = min(width, int(crop_height * rng.uniform(3 / 4, 4 / 3)))
        top = int(rng.integers(0, height - crop_height + 1))
        left = int(rng.integers(0, width - crop_width + 1))
        image = Image.fromarray(photo[top : top + crop_height, left : left + crop_width])
        scale = DATA_IMAGE_SIZE / max(crop_height, crop_width)
        image = image.resize((round(crop_width * scale), round(crop_height * scale)), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        label_dir = os.path.join(root, os.path.splitext(os.path.basename(photos.filenames[label]))[0])
        os.makedirs(label_dir, exist_ok=True)
        image.save(os.path.join(label_dir, f'{index:05d}.jpg'), quality=90)


class _TwoViewImageFolder(Dataset):
    """torchvision's ``ImageFolder`` over ``paths``, returning ``{'view0', 'view1', 'label'}`` like the MDS dataset.

    Sample ``i`` is ``paths[i]`` and its transforms draw as the dataset's sample ``i`` does (``sample_draws``). With
    ``paths`` in the shards' order both sides crop the same regions, whose size sets most of the transform's cost.
    """

    def __init__(self, root: str, views: tuple[Callable, Callable], paths: list[str], augmentation_seed: int) -> None:
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(root)
        labels = dict(self.folder.samples)
        self.folder.samples = self.folder.imgs = [(path, labels[path]) for path in paths]
        self.views = views
        self.augmentation_seed = augmentation_seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from composer_maect.data.dataset import sample_draws

        image, label = self.folder[index]
        with sample_draws(self.augmentation_seed, 0, index):
            return {'view0': self.views[0](image), 'view1': self.views[1](image), 'label': label}


def _paths_in_shard_order(folder: str, shards: str) -> list[str]:
    """Return the JPEG paths under ``folder`` in the order of the converter's samples, matched by their bytes."""
    from streaming import StreamingDataset

    by_content = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as file:
                by_content[file.read()] = path
    samples = StreamingDataset(local=shards, split='train', shuffle=False, batch_size=1)
    return [by_content[samples[position]['image']] for position in range(samples.num_samples)]


def _samples_per_second(loader: DataLoader) -> float:
    """Return samples/s over all batches after the first, so worker start-up is not counted."""
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    samples = 0
    for batch in iterator:
        samples += int(batch['view0'].shape[0])
    elapsed = time.perf_counter() - start
    return samples / elapsed if samples else float('nan')


def _jpeg_decoders() -> dict[str, Callable[[bytes], Any]]:
    """Return the JPEG decoders to compare: the dataset's ``'pil'`` and ``'auto'`` (``decode_jpeg``) decoders."""
    from composer_maect.data.decode import decode_rgb

    return {
        'PIL': functools.partial(decode_rgb, decoder='pil'),
        'torchvision.io.decode_jpeg': functools.partial(decode_rgb, decoder='auto'),
    }


def run_decode(folder: str, views: tuple[Callable, Callable], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure decoding plus two views per CPU second, on one thread, for each decoder of ``_jpeg_decoders``.

    A DataLoader worker runs torch on one thread, so this is the rate of one worker without the loader around it.
    """
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    encoded = []
    for path in paths:
        with open(path, 'rb') as file:
            encoded.append(file.read())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name, decode in _jpeg_decoders().items():
            start = time.process_time()
            for data in encoded:
                image = decode(data)
                views[0](image)
                views[1](image)
            rate = len(encoded) / (time.process_time() - start)
            row = {'row': 'decode', 'decoder': name, 'transform': args.data_transform, 'images': len(encoded)}
            row.update({'img_size': args.data_img_size, 'threads': 1})
            rows.append({**row, 'samples_per_cpu_s': rate})
    finally:
        torch.set_num_threads(threads)
    return rows


def run_data(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure two-view samples/s per worker of the MDS loader, with each decoder, and of ImageFolder on the same JPEGs.

    ImageFolder opens every file and decodes it with PIL, torchvision's default loader; it reads the files in the
    shards' order and draws the same crops. One row per worker count and MDS decoder: ``'pil'`` decodes as ImageFolder
    does, so it compares reading, and ``'auto'`` is the dataset's default. Also measures each JPEG decoder with the
    same two-view transform (``decode`` rows).
    """
    from composer_maect.data.convert import convert
    from composer_maect.data.dataset import build_image_dataloader
    from composer_maect.data.decode import DECODERS
    from composer_maect.data.transforms import build_transform

    pipelines = build_transform(args.data_transform, img_size=args.data_img_size)
    # One pipeline per view: contrastive_aug builds a pair, the other pipelines serve both views.
    views = pipelines if isinstance(pipelines, tuple) else (pipelines, pipelines)
    rows = []
    with tempfile.TemporaryDirectory(prefix='maect-benchmark-') as tmp:
        folder = os.path.join(tmp, 'jpegs')
        shards = os.path.join(tmp, 'mds')
        write_photo_jpegs(folder, args.data_images)
        convert(folder, shards, val_fraction=None, progress=False)
        paths = _paths_in_shard_order(folder, shards)
        for num_workers in DATA_NUM_WORKERS:
            loaders = {
                decoder: build_image_dataloader(
                    local=shards,
                    split='train',
                    batch_size=args.data_batch,
                    views=2,
                    transform=views,
                    shuffle=False,
                    augmentation_seed=DATA_AUGMENTATION_SEED,
                    decoder=decoder,
                    num_workers=num_workers,
                )
                for decoder in DECODERS
            }
            loaders['ImageFolder'] = DataLoader(
                _TwoViewImageFolder(folder, views, paths, DATA_AUGMENTATION_SEED),
                batch_size=args.data_batch,
                num_workers=num_workers,
                drop_last=True,
            )
            # Alternate the loaders, as the model rows alternate their sides, starting each pass with the next one,
            # and keep the median pass of each.
            names = list(loaders)
            rates: dict[str, list[float]] = {name: [] for name in names}
            for repeat in range(DATA_PASSES):
                for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                    rates[name].append(_samples_per_second(loaders[name]))
            del loaders
            workers = max(1, num_workers)  # With 0 workers the main process does the loading.
            folder_rate = statistics.median(rates['ImageFolder'])
            for decoder in DECODERS:
                mds_rate = statistics.median(rates[decoder])
                rows.append(
                    {
                        'row': 'data',
                        'num_workers': num_workers,
                        'decoder': decoder,
                        'transform': args.data_transform,
                        'images': args.data_images,
                        'img_size': args.data_img_size,
                        'batch': args.data_batch,
                        'samples_per_s_per_worker': mds_rate / workers,
                        'reference_samples_per_s_per_worker': folder_rate / workers,
                        'overhead_ratio': folder_rate / mds_rate - 1.0,
                    }
                )
        rows.extend(run_decode(folder, views, args))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------------


def _peak_memory_bytes(device: str) -> int:
    if device == 'cuda':
        return torch.cuda.max_memory_allocated()
    # VmHWM is the peak resident set size of this address space, in KiB. ru_maxrss would not do, because Linux
    # copies the parent's peak into a child at fork, so a child of a large benchmark process inherits its peak.
    with open('/proc/self/status') as file:
        for line in file:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError('VmHWM not found in /proc/self/status, so the peak memory cannot be measured on this system.')


def _current_memory_bytes(device: str) -> int:
    """Return the memory in use now: allocated CUDA memory, or the resident set size from ``/proc/self/statm``."""
    if device == 'cuda':
        return torch.cuda.memory_allocated()
    with open('/proc/self/statm') as file:
        resident_pages = int(file.read().split()[1])
    return resident_pages * os.sysconf('SC_PAGE_SIZE')


def probe_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Run 2 tuning steps in this process and return the peak memory above the memory in use before, in bytes.

    On CPU the peak resident set size cannot be reset, so this must run in a fresh process per configuration. The
    baseline is taken after the imports, so the peak includes the model, optimizer state, queue and activations.
    """
    import composer  # noqa: F401  # Imported before the baseline, which then leaves out the library code.

    import composer_maect.algorithms  # noqa: F401

    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    before = _current_memory_bytes(args.device)
    trainer, _ = _build_tuning_trainer(args, None, [], grad_checkpointing=args.grad_checkpointing)
    trainer.fit(duration='2ba')
    trainer.close()
    return {'peak_bytes': _peak_memory_bytes(args.device) - before}


def run_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure the tuning step's peak memory per model and batch, with and without activation checkpointing."""
    rows = []
    measure = 'cuda max_memory_allocated' if args.device == 'cuda' else 'VmHWM above the RSS after imports'
    models = args.memory_models or [args.model]
    batches = args.memory_batches or [args.batch]
    for model in models:
        for batch in batches:
            for checkpointing in (False, True):
                child = [sys.executable, '-m', 'composer_maect.benchmark', '--memory-probe']
                child += ['--model', model, '--batch', str(batch), '--img-size', str(args.img_size)]
                child += ['--queue-size', str(args.queue_size), '--threads', str(args.threads)]
                child += ['--precision', args.precision, '--device', args.device]
                if args.patch_size is not None:
                    child += ['--patch-size', str(args.patch_size)]
                if args.depth is not None:
                    child += ['--depth', str(args.depth)]
                if checkpointing:
                    child.append('--grad-checkpointing')
                result = subprocess.run(child, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise RuntimeError(
                        f'Memory probe failed with exit status {result.returncode}: {shlex.join(child)}\n'
                        f'{result.stderr[-2000:]}'
                    )
                peak = json.loads(result.stdout.strip().splitlines()[-1])['peak_bytes']
                rows.append(
                    {
                        'row': 'memory',
                        'model': model,
                        'img_size': args.img_size,
                        'batch': batch,
                        'grad_checkpointing': checkpointing,
                        'peak_mib': peak / 2**20,
                        'measure': measure,
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# GPU section
# ---------------------------------------------------------------------------------------------------------------------


def run_gpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure ViT-L/16 and ViT-H/14 tuning steps in bf16 on one GPU, stopping once 5 minutes are used.

    Each row has the images/s and MFU of ``run_tuning`` and ``peak_mib``, the peak allocated CUDA memory of a
    separate 2-step run of the Trainer alone (``probe_memory``). One GPU is one rank, so FSDP would not shard
    anything and is not used. Without CUDA, returns one row whose ``skipped`` field gives the reason.

    NOTE: this path has not been run on a GPU yet. The time budget is checked only between models, so one slow model
    can exceed it.
    """
    if not torch.cuda.is_available():
        log.warning('Skipping the gpu rows: CUDA is not available on this machine.')
        return [{'row': 'gpu', 'skipped': 'CUDA is not available on this machine'}]
    gpu_args = argparse.Namespace(**vars(args))
    gpu_args.device, gpu_args.precision = 'cuda', 'bf16'
    gpu_args.img_size, gpu_args.patch_size, gpu_args.depth = 224, None, None
    gpu_args.batch = args.gpu_batch
    matmul = measure_matmul_flops('cuda', torch.bfloat16, size=8192)
    rows = []
    start = time.perf_counter()
    for model in GPU_MODELS:
        if time.perf_counter() - start > GPU_TIME_BUDGET_S:
            log.warning('Skipping %s: the gpu rows used their %d s budget.', model, GPU_TIME_BUDGET_S)
            continue
        row = run_tuning(gpu_args, matmul, model_name=model)
        row.update({'row': 'gpu', 'device': 'cuda', 'precision': 'bf16'})
        # Free the timed Trainer and reference first, so that the probe's peak counts only its own tensors.
        gc.collect()
        torch.cuda.empty_cache()
        probe_args = argparse.Namespace(**vars(gpu_args))
        probe_args.model = model
        row['peak_mib'] = probe_memory(probe_args)['peak_bytes'] / 2**20
        rows.append(row)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _comma_list(parser: argparse.ArgumentParser, option: str, value: str | None, cast: Callable = str) -> list | None:
    """Split a comma-separated option value, or report the invalid item through ``parser.error``."""
    if value is None:
        return None
    items = [item for item in value.split(',') if item]
    if not items:
        parser.error(f'{option} needs at least one comma-separated value, got {value!r}.')
    try:
        return [cast(item) for item in items]
    except ValueError:
        parser.error(f'{option} takes comma-separated {cast.__name__} values, got {value!r}.')


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m composer_maect.benchmark',
        description='Benchmark MAE-CT training steps in a Composer Trainer against plain PyTorch loops.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('--model', default='vit_tiny_patch16', help='encoder alias or timm ViT name')
    parser.add_argument('--img-size', type=int, default=32, help='image side in pixels for model rows')
    parser.add_argument('--patch-size', type=int, default=None, help="patch side in pixels; None takes the model's")
    parser.add_argument('--depth', type=int, default=None, help="number of ViT blocks; None takes the model's")
    parser.add_argument('--batch', type=int, default=32, help='images per step')
    parser.add_argument('--queue-size', type=int, default=4096, help='NNCLR queue entries')
    parser.add_argument('--steps', type=int, default=2, help='measured steps per side')
    parser.add_argument(
        '--blocks', type=int, default=None, help='alternating blocks of steps; None gives one step per block'
    )
    parser.add_argument('--warmup', type=int, default=1, help='unmeasured steps per side before timing')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch intra-op threads')
    parser.add_argument(
        '--precision', choices=sorted(PRECISIONS), default='fp32', help='precision of the model rows (bf16 needs cuda)'
    )
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu', help='device of the model rows')
    parser.add_argument('--rows', default=DEFAULT_ROWS, help=f'comma-separated rows among {",".join(ROW_NAMES)}')
    parser.add_argument('--json', default=None, metavar='OUT', help='write the rows to this JSON file')
    parser.add_argument('--data-images', type=int, default=128, help='JPEGs written for the data row')
    parser.add_argument('--data-img-size', type=int, default=224, help='crop side of the data row in pixels')
    parser.add_argument('--data-batch', type=int, default=16, help='samples per batch of the data row')
    parser.add_argument(
        '--data-transform',
        choices=('contrastive', 'contrastive_aug', 'mae'),
        default='contrastive',
        help='view pipeline of the data row (contrastive: the crop and flip of MAE-CT)',
    )
    parser.add_argument(
        '--memory-models', default=None, help='comma-separated models of the memory row; None takes --model'
    )
    parser.add_argument(
        '--memory-batches', default=None, help='comma-separated batch sizes of the memory row; None takes --batch'
    )
    parser.add_argument('--gpu-batch', type=int, default=64, help='images per step of the gpu rows')
    parser.add_argument(
        '--compile', action='store_true', help='compile every encoder block with torch.compile (first steps are slow)'
    )
    parser.add_argument(
        '--profile',
        action='store_true',
        help='after timing, profile one more step of each side of the tuning row with cProfile and print the seconds '
        'of its parts',
    )
    parser.add_argument('--memory-probe', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--grad-checkpointing', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    rows = _comma_list(parser, '--rows', args.rows)
    unknown = sorted(set(rows) - set(ROW_NAMES))
    if unknown:
        parser.error(f'unknown rows {unknown}; choose among {list(ROW_NAMES)}.')
    args.rows = rows
    if args.blocks is None:
        args.blocks = args.steps
    positive = ['batch', 'steps', 'threads', 'queue_size', 'img_size', 'blocks', 'gpu_batch']
    positive += ['data_images', 'data_img_size', 'data_batch']
    positive += [name for name in ('depth', 'patch_size') if getattr(args, name) is not None]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}.')
    if args.warmup < 0:
        parser.error(f'--warmup must be 0 or more, got {args.warmup}.')
    if args.blocks > args.steps:
        parser.error(
            f'--blocks {args.blocks} must be at most --steps {args.steps}: every block times at least one step.'
        )
    if args.queue_size % args.batch:
        parser.error(f'--queue-size {args.queue_size} must be a multiple of --batch {args.batch}.')
    args.memory_models = _comma_list(parser, '--memory-models', args.memory_models)
    args.memory_batches = _comma_list(parser, '--memory-batches', args.memory_batches, int)
    for batch in args.memory_batches or []:
        if batch < 1 or args.queue_size % batch:
            parser.error(
                f'--memory-batches value {batch} must be a positive divisor of --queue-size {args.queue_size}.'
            )
    if 'data' in args.rows and args.data_images < 2 * args.data_batch:
        # The first batch of every pass is not timed, so a pass needs a second one.
        parser.error(
            f'--data-images {args.data_images} must be at least twice --data-batch {args.data_batch}, so that '
            'every pass times at least one batch.'
        )
    if 'gpu' in args.rows and torch.cuda.is_available() and args.queue_size % args.gpu_batch:
        parser.error(
            f'--queue-size {args.queue_size} must be a multiple of --gpu-batch {args.gpu_batch} for the gpu rows. '
            'Change one of them, or leave gpu out of --rows.'
        )
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda was requested but CUDA is not available. Use --device cpu.')
    if args.precision == 'bf16' and args.device != 'cuda':
        parser.error('--precision bf16 needs --device cuda: Composer trains in bf16 only on GPUs. Use fp32 on the CPU.')
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            parser.error(f'--json {args.json}: folder {folder} does not exist. Create it or choose another path.')
    return args


def _model_config(row: dict[str, Any]) -> str:
    config = row['model']
    for key, label in (('depth', 'depth'), ('patch_size', 'patch')):
        if row.get(key) is not None:
            config += f' {label}={row[key]}'
    return f'{config} img={row["img_size"]} batch={row["batch"]}'


def _format_table(rows: list[dict[str, Any]]) -> str:
    columns = ['row', 'config', 'maect', 'reference', 'overhead', 'mfu', 'device', 'precision', 'threads']
    lines = []
    for row in rows:
        if 'skipped' in row:
            lines.append([row['row'], f'skipped: {row["skipped"]}', '', '', '', '', '', '', ''])
            continue
        if row['row'] == 'data':
            config = f'{row["transform"]} workers={row["num_workers"]} batch={row["batch"]} img={row["img_size"]}'
            maect = f'{row["samples_per_s_per_worker"]:.1f} samples/s/worker (MDS, decoder {row["decoder"]})'
            reference = f'{row["reference_samples_per_s_per_worker"]:.1f} (ImageFolder, PIL)'
            overhead, mfu = f'{row["overhead_ratio"]:+.3f}', '-'
        elif row['row'] == 'decode':
            config = f'{row["decoder"]} {row["transform"]} img={row["img_size"]} images={row["images"]}'
            maect = f'{row["samples_per_cpu_s"]:.1f} samples/CPU s (decode + 2 views, 1 thread)'
            reference, overhead, mfu = '-', '-', '-'
        elif row['row'] == 'memory':
            config = f'{_model_config(row)} ckpt={row["grad_checkpointing"]}'
            maect, reference, overhead, mfu = f'{row["peak_mib"]:.0f} MiB peak', '-', '-', '-'
        else:
            config = _model_config(row)
            maect = f'{row["images_per_s"]:.2f} img/s'
            if 'peak_mib' in row:
                maect += f', {row["peak_mib"]:.0f} MiB peak'
            reference = f'{row["reference_images_per_s"]:.2f} img/s'
            overhead = f'{row["overhead_ratio"]:+.3f} (cpu {row["cpu_overhead_ratio"]:+.3f})'
            mfu = f'{row["mfu"]:.3f} (ref {row["reference_mfu"]:.3f})'
        cells = [row['row'], config, maect, reference, overhead, mfu]
        lines.append([*cells, row['device'], row['precision'], str(row['threads'])])
    widths = [max(len(columns[i]), *(len(line[i]) for line in lines)) for i in range(len(columns))]
    header = ' | '.join(name.ljust(width) for name, width in zip(columns, widths, strict=True))
    body = [' | '.join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    return '\n'.join([header, '-' * len(header), *body])


def _format_profile(row: dict[str, Any]) -> str:
    profile = row['profile_seconds']
    lines = [f'{row["row"]} step parts in seconds (cProfile, one step each; parts nest):']
    for component, _, _ in PROFILED_FUNCTIONS:
        cells = [f'{profile[side][component]:8.3f}' if component in profile[side] else '       -' for side in profile]
        lines.append(f'  {component:34s} trainer {cells[0]}  reference {cells[1]}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark CLI: print one table and optionally write the rows as JSON. Returns the exit status."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger('composer').setLevel(logging.WARNING)

    if args.memory_probe:
        print(json.dumps(probe_memory(args)))
        return 0

    command = shlex.join(['python', '-m', 'composer_maect.benchmark', *(sys.argv[1:] if argv is None else argv)])
    needs_matmul = any(row in args.rows for row in ('tuning', 'mae'))
    matmul_dtype = PRECISIONS[args.precision][1] or torch.float32
    matmul = measure_matmul_flops(args.device, matmul_dtype) if needs_matmul else None
    rows: list[dict[str, Any]] = []
    if 'tuning' in args.rows:
        rows.append(run_tuning(args, matmul))
    if 'mae' in args.rows:
        rows.append(run_mae(args, matmul))
    if needs_matmul:
        # Measured again after the model rows, so that a burst of load during one measurement does not inflate MFU.
        matmul_measurements = [matmul, measure_matmul_flops(args.device, matmul_dtype)]
        matmul = max(matmul_measurements)
        for row in rows:
            _set_mfu(row, matmul)
    if 'data' in args.rows:
        rows.extend(run_data(args))
    if 'memory' in args.rows:
        rows.extend(run_memory(args))
    for row in rows:
        row.update({'command': command, 'device': args.device, 'precision': args.precision})
        row.setdefault('threads', args.threads)  # The decode rows run on one thread and record it themselves.
        if 'model' in row:
            row.update({'depth': args.depth, 'patch_size': args.patch_size, 'queue_size': args.queue_size})
    if 'gpu' in args.rows:
        for row in run_gpu(args):
            row.update({'command': command, 'threads': args.threads})
            rows.append(row)

    print(f'command: {command}')
    print(_format_table(rows))
    for row in rows:
        if 'profile_seconds' in row:
            print(_format_profile(row))
    if args.json:
        with open(args.json, 'w') as file:
            report = {'command': command, 'matmul_flops_per_s': matmul, 'rows': rows}
            if needs_matmul:
                report['matmul_flops_per_s_measurements'] = matmul_measurements
            json.dump(report, file, indent=2)
    return 0


if __name__ == '__main__':
    # Import by module name so that the logger is composer_maect.benchmark and not __main__.
    from composer_maect.benchmark import main as benchmark_main

    sys.exit(benchmark_main())
