"""Describe what a training YAML would run, without data, GPUs or training: ``python -m composer_maect.train YAML
--dry-run``.

Each phase's model is built on the meta device, so no weights are allocated and ``init_from`` is not read. The
optimizer is built as ``train.train`` builds it. Then the INIT effects of the phase's algorithms are applied in YAML
order, without a Trainer. ``contrastive_tuning`` attaches its NNCLR head and adds the head's optimizer groups.
``layerwise_unfreezing`` runs its own INIT code on a bare Composer ``State``, which freezes blocks and replaces the
encoder's optimizer groups. Other algorithms, and the callbacks, are only built, which checks their arguments. The
report lists what training would use: batch sizes per rank, parameter counts, every optimizer group with its peak
learning rate, matmul FLOPs, data, precision, parallelism, algorithms, callbacks and checkpoints.

The checks that ``train.py`` runs before it builds anything are run here too, except the check for local shards: a
dry run reports missing data instead of failing on it. Training itself may still fail on what only a real run can
show (data that cannot be downloaded, out-of-memory, a checkpoint that does not match).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from composer.core import Event, State
from composer.devices import DeviceCPU
from composer.loggers import Logger
from torch import nn

from composer_maect import registry
from composer_maect.algorithms.contrastive_tuning import HEAD_ATTRIBUTE, ContrastiveTuning, attach_contrastive_head
from composer_maect.algorithms.layerwise_unfreezing import LayerwiseUnfreezing, find_vision_transformer
from composer_maect.checkpoints import check_encoder_weights
from composer_maect.config import ConfigError, RunPlan, TrainConfig
from composer_maect.optim import build_adamw, build_scheduler, scaled_lr
from composer_maect.train import (
    build_model,
    check_config,
    check_phases,
    final_checkpoint,
    import_code_paths,
    phase_run_name,
)

__all__ = ['describe_phase', 'describe_run', 'resolve_world_size']

# Width of the label column of the report.
_LABEL_WIDTH = 20


def resolve_world_size(world_size: int | None = None) -> tuple[int, str]:
    """Return the number of processes to describe and a sentence that names where the number comes from.

    An explicit ``world_size`` wins over the ``WORLD_SIZE`` environment variable (set by ``composer -n``). Without
    either, the number is 1.

    Raises:
        ConfigError: if the value is not a positive integer.
    """
    if world_size is not None:
        source = 'given explicitly'
        value: Any = world_size
    elif 'WORLD_SIZE' in os.environ:
        source = 'from the WORLD_SIZE environment variable'
        value = os.environ['WORLD_SIZE']
    else:
        return (
            1,
            'WORLD_SIZE is not set, so the report assumes 1 process. Set WORLD_SIZE=8 to see the numbers of 8 GPUs.',
        )
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1:
        raise ConfigError(f'Invalid world size {value!r} ({source}): expected a positive integer number of processes.')
    return number, f'The number of processes is {source}.'


def describe_run(plan: RunPlan, *, world_size: int | None = None) -> str:
    """Build every phase of ``plan`` on the meta device and return the report, one section per phase.

    Args:
        plan: the validated YAML, from :func:`composer_maect.config.load_run`.
        world_size: the number of processes to describe. Default: ``WORLD_SIZE`` from the environment, or 1.

    Raises:
        ConfigError: if a phase would fail before training starts (an invalid algorithm or callback argument, a batch
            that the processes or the queue cannot divide, an encoder that cannot be built, ...).
    """
    processes, world_size_note = resolve_world_size(world_size)
    check_phases(plan.phases)
    count = len(plan.phases)
    lines = [
        f'Dry run of {_plural(count, "phase")} with {_plural(processes, "process", "processes")}. {world_size_note}',
        'Models are built on the meta device: no weights were allocated or loaded, no data was read.',
    ]
    if plan.run_first is not None:
        first, target = plan.run_first.yaml, plan.run_first.unless_exists
        if Path(target).exists():
            lines.append(f'run_first: {first} is skipped, because {target} exists.')
        else:
            lines.append(f'run_first: {first} runs first, because {target} does not exist (not described here).')

    problems: list[str] = []
    previous: TrainConfig | None = None
    for index, cfg in enumerate(plan.phases):
        lines.append('')
        lines.extend(describe_phase(cfg, processes, index=index, count=count, previous=previous, problems=problems))
        previous = cfg

    lines.append('')
    if problems:
        lines.append(f'{len(problems)} problem(s) would stop training:')
        lines.extend(f'  - {problem}' for problem in problems)
    else:
        lines.append('No problem found that would stop training before its first step.')
    return '\n'.join(lines)


def describe_phase(
    cfg: TrainConfig,
    world_size: int,
    *,
    index: int = 0,
    count: int = 1,
    previous: TrainConfig | None = None,
    problems: list[str] | None = None,
) -> list[str]:
    """Build one phase on the meta device and return its report lines.

    Problems that only a real run would hit (a missing ``init_from`` file, no data) are appended to ``problems``.

    Raises:
        ConfigError: as :func:`describe_run`.
    """
    problems = [] if problems is None else problems
    name = cfg.name or phase_run_name(cfg)
    import_code_paths(cfg.code_paths)
    _check_phase(cfg, world_size, name)

    model, optimizer = _build_phase(cfg, world_size, name)
    if cfg.name is None:
        lines = [f'Run {phase_run_name(cfg)} (no phases)']
    else:
        lines = [f'Phase {index + 1} of {count}: {name} (Trainer run name {phase_run_name(cfg)})']
    lines += _describe_schedule(cfg, world_size)
    lines += _describe_start(cfg, previous, model, problems)
    lines += _describe_model(cfg, model)
    lines += _describe_parameters(model)
    lines += _describe_learning_rate(cfg)
    lines += _describe_optimizer(cfg, optimizer)
    lines += _describe_flops(cfg, model)
    lines += _describe_data(cfg, problems)
    lines += _describe_parallelism(cfg, world_size)
    lines += _describe_components(cfg)
    lines += _describe_checkpoints(cfg)
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Checks and building
# ---------------------------------------------------------------------------------------------------------------------


def _check_phase(cfg: TrainConfig, world_size: int, name: str) -> None:
    """Reject what the trainer rejects before building anything, apart from missing local shards."""
    try:
        check_config(cfg, world_size, require_data=False)
        build_scheduler(cfg.scheduler.warmup, cfg.scheduler.alpha_f)
    except (ConfigError, ValueError) as error:
        raise ConfigError(f'Phase {name!r}: {error}') from None


def _build_components(kind: str, entries: Mapping[str, Any], phase: str) -> dict[str, Any]:
    """Build each entry of a YAML section through the registry and return ``{name: object}`` in YAML order."""
    built = {}
    for entry, kwargs in entries.items():
        try:
            (built[entry],) = registry.build(kind, {entry: kwargs})
        except ValueError as error:
            raise ConfigError(f'Phase {phase!r}, {kind}.{entry}: {error}') from None
    return built


def _build_phase(cfg: TrainConfig, world_size: int, name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Build the model and optimizer on the meta device and apply the INIT effects of the phase's algorithms."""
    algorithms = _build_components('algorithms', cfg.algorithms, name)
    # Callbacks are built only to check their arguments. Loggers are not built, because some connect to a service.
    _build_components('callbacks', cfg.callbacks, name)

    try:
        with torch.device('meta'):
            model = build_model(cfg.model, load_weights=False)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"Phase {name!r}: 'model' cannot be built: {error}") from None

    lr = scaled_lr(cfg.optimizer.base_lr, cfg.global_train_batch_size, cfg.train_loader.views, cfg.optimizer.lr_scaling)
    optimizer = build_adamw(
        model, lr=lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay
    )

    # The Trainer runs INIT for the algorithms in list order. The order matters, because layerwise_unfreezing takes its
    # lr from the optimizer groups that contain the encoder and rejects an optimizer left without parameters.
    state = State(
        model=model,
        rank_zero_seed=cfg.seed,
        run_name=phase_run_name(cfg),
        device=DeviceCPU(),
        optimizers=optimizer,
        algorithms=list(algorithms.values()),
    )
    logger = Logger(state, destinations=[])
    for entry, algorithm in algorithms.items():
        try:
            if isinstance(algorithm, ContrastiveTuning):
                with torch.device('meta'):
                    attach_contrastive_head(model, optimizer, **algorithm.head_kwargs)
                _check_contrastive_batch(cfg, model, world_size)
            elif isinstance(algorithm, LayerwiseUnfreezing):
                algorithm.apply(Event.INIT, state, logger)
        except ValueError as error:
            raise ConfigError(f'Phase {name!r}, algorithms.{entry}: {error}') from None
    return model, optimizer


def _check_contrastive_batch(cfg: TrainConfig, model: nn.Module, world_size: int) -> None:
    """Raise ValueError where ContrastiveTuning would raise at FIT_START."""
    getattr(model, HEAD_ATTRIBUTE).queue.check_batch_size(cfg.global_train_batch_size)
    per_rank = cfg.global_train_batch_size // world_size
    microbatch = cfg.device_train_microbatch_size
    if microbatch is not None and microbatch < per_rank:
        raise ValueError(
            f'device_train_microbatch_size ({microbatch}) splits the per-rank batch of {per_rank}, but batch norm '
            'statistics and in-batch negatives need whole batches. Remove device_train_microbatch_size or make it '
            'equal to the per-rank batch size.'
        )


# ---------------------------------------------------------------------------------------------------------------------
# Report sections
# ---------------------------------------------------------------------------------------------------------------------


def _row(label: str, value: str) -> str:
    return f'  {label:<{_LABEL_WIDTH}}{value}'


def _plural(number: int, singular: str, plural: str | None = None) -> str:
    """Format a count with its noun: ``'1 step'``, ``'2 steps'``, ``'1,024 images'``."""
    word = singular if number == 1 else (plural or f'{singular}s')
    return f'{number:,} {word}'


def _sample_count(folder: Path) -> int | None:
    """Return the number of samples that an MDS ``index.json`` in ``folder`` lists, or None without a readable one."""
    try:
        with open(folder / 'index.json') as file:
            shards = json.load(file)['shards']
        return sum(int(shard['samples']) for shard in shards)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _train_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.train_loader.local) / (cfg.train_loader.split or '')


def _describe_schedule(cfg: TrainConfig, world_size: int) -> list[str]:
    batch = cfg.global_train_batch_size
    # Composer reads an int max_duration as epochs.
    duration = f'{cfg.max_duration}ep' if isinstance(cfg.max_duration, int) else cfg.max_duration
    samples = _sample_count(_train_folder(cfg))
    if samples is not None and duration.endswith('ep') and duration[:-2].isdigit():
        # drop_last: every step takes a whole global batch.
        steps_per_epoch = samples // batch
        total_steps = steps_per_epoch * int(duration[:-2])
        duration += f' (about {_plural(steps_per_epoch, "step")} per epoch, {_plural(total_steps, "step")})'
    per_rank = batch // world_size
    views = cfg.train_loader.views
    return [
        _row('duration', duration),
        _row(
            'batch',
            f'{_plural(batch, "image")} globally, {per_rank:,} per rank on {_plural(world_size, "rank")}, '
            f'{_plural(views, "view")} per image',
        ),
    ]


def _describe_start(cfg: TrainConfig, previous: TrainConfig | None, model: nn.Module, problems: list[str]) -> list[str]:
    if previous is not None:
        return [_row('starts from', f'the last checkpoint of phase {previous.name}: {final_checkpoint(previous)}')]
    phase = cfg.name or phase_run_name(cfg)
    init_from = cfg.model.init_from
    if init_from is None:
        return [_row('starts from', 'random initialisation (no model.init_from)')]
    path = init_from.path
    if '://' in path:
        status = 'NOT a local file: init_from reads local files only'
        problems.append(f'{phase}: model.init_from {path!r} is a URI. Download it to a local file.')
    elif Path(path).exists():
        # Keys and shapes are checked against the meta-device model; the tensors are memory-mapped, not read.
        try:
            status = check_encoder_weights(find_vision_transformer(model), path, weights=init_from.weights)
        except (ValueError, OSError) as error:
            status = 'does NOT match the encoder'
            problems.append(f'{phase}: model.init_from {path!r}: {error}')
    else:
        status = 'NOT FOUND'
        problems.append(f'{phase}: model.init_from file {path!r} not found.')
    return [_row('starts from', f'model.init_from {path}: {status}')]


def _describe_model(cfg: TrainConfig, model: nn.Module) -> list[str]:
    vit = find_vision_transformer(model)
    patch = tuple(vit.patch_embed.patch_size)
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    return [
        _row(
            'model',
            f'{cfg.model.name} with encoder {cfg.model.encoder.name}: {len(vit.blocks)} blocks, width {vit.embed_dim}, '
            f'patch {patch[0]}x{patch[1]}, {cfg.model.encoder.img_size} px, {tokens} tokens',
        )
    ]


def _count(parameters: list[nn.Parameter]) -> tuple[int, int]:
    total = sum(param.numel() for param in parameters)
    trainable = sum(param.numel() for param in parameters if param.requires_grad)
    return total, trainable


def _describe_parameters(model: nn.Module) -> list[str]:
    vit = find_vision_transformer(model)
    encoder_ids = {id(param) for param in vit.parameters()}
    head = getattr(model, HEAD_ATTRIBUTE, None)
    head_ids = {id(param) for param in head.parameters()} if head is not None else set()
    parts = {
        'encoder': [param for param in model.parameters() if id(param) in encoder_ids],
        'head': [param for param in model.parameters() if id(param) in head_ids],
        'other': [param for param in model.parameters() if id(param) not in encoder_ids | head_ids],
        'all': list(model.parameters()),
    }
    lines = [_row('parameters', f'{"total":>15}{"trainable":>15}{"frozen":>15}')]
    for part, parameters in parts.items():
        if not parameters and part != 'encoder':
            continue
        total, trainable = _count(parameters)
        lines.append(_row(f'  {part}', f'{total:>15,}{trainable:>15,}{total - trainable:>15,}'))
    return lines


def _describe_learning_rate(cfg: TrainConfig) -> list[str]:
    settings = cfg.optimizer
    lr = scaled_lr(settings.base_lr, cfg.global_train_batch_size, cfg.train_loader.views, settings.lr_scaling)
    if settings.lr_scaling == 'views':
        formula = f'base {settings.base_lr:g} x {cfg.train_loader.views} views x {cfg.global_train_batch_size} / 256'
    elif settings.lr_scaling == 'images':
        formula = f'base {settings.base_lr:g} x {cfg.global_train_batch_size} images / 256'
    else:
        formula = f'base {settings.base_lr:g}, not scaled'

    warmup = cfg.scheduler.warmup
    if isinstance(warmup, float):
        warmup_text = 'no warmup' if warmup == 0 else f'linear warmup over {warmup:.0%} of the phase'
    else:
        warmup_text = f'linear warmup over {warmup}'
    alpha_f = cfg.scheduler.alpha_f
    decay_text = 'cosine decay to 0' if alpha_f == 0 else f'cosine decay to {alpha_f:g} x the peak lr'
    return [
        _row('learning rate', f'{formula} = {lr:.3e} (lr_scaling: {settings.lr_scaling})'),
        _row('schedule', f'{warmup_text}, then {decay_text}, stepped every batch'),
    ]


def _describe_optimizer(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> list[str]:
    settings = cfg.optimizer
    lines = [
        _row(
            'optimizer',
            f'torch.optim.AdamW with betas ({settings.betas[0]:g}, {settings.betas[1]:g}) and eps {settings.eps:g}, '
            f'{len(optimizer.param_groups)} groups (lr: the peak before the schedule)',
        ),
    ]
    width = max(len(str(group.get('name', ''))) for group in optimizer.param_groups) + 2
    width = max(width, len('group 00') + 2)
    for index, group in enumerate(optimizer.param_groups):
        group_name = str(group.get('name', f'group {index}'))
        numel = sum(param.numel() for param in group['params'])
        peak = float(group.get('initial_lr', group['lr']))
        lines.append(
            f'    {group_name:<{width}}{len(group["params"]):>4} tensors{numel:>14,} params'
            f'   lr {peak:.3e}   weight decay {group["weight_decay"]:g}'
        )
    return lines


def _meta_batch(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Return a batch of one image in the layout of the training batches, on the meta device."""
    size = cfg.model.encoder.img_size
    image = torch.empty(1, cfg.model.encoder.in_chans, size, size, device='meta')
    if cfg.train_loader.views == 2:
        return {'view0': image, 'view1': image}
    return {'image': image}


def _format_flops(flops: float) -> str:
    for unit, scale in (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6)):
        if flops >= scale:
            return f'{flops / scale:,.3g} {unit}'
    return f'{flops:,.0f} FLOP'


def _describe_flops(cfg: TrainConfig, model: nn.Module) -> list[str]:
    flops_per_batch = getattr(model, 'flops_per_batch', None)
    if flops_per_batch is None:
        return [_row('FLOPs', f'not known: {type(model).__name__} has no flops_per_batch')]
    per_image = flops_per_batch(_meta_batch(cfg))
    scope = 'for the encoder only (the NNCLR head is not counted)' if hasattr(model, HEAD_ATTRIBUTE) else 'whole model'
    views = _plural(cfg.train_loader.views, 'view')
    return [
        _row('FLOPs per image', f'{_format_flops(per_image)} ({per_image:,})'),
        _row('', f'matmul FLOPs of forward and backward over the {views} of one image, {scope}'),
        _row('FLOPs per step', _format_flops(per_image * cfg.global_train_batch_size)),
    ]


def _describe_split(label: str, remote: str | None, local: str, problems: list[str] | None, phase: str) -> list[str]:
    """Return the remote and local folder of one MDS split and the sample count in its local ``index.json``."""
    samples = _sample_count(Path(local))
    if samples is not None:
        found = f'{samples:,} samples in the local index.json'
    elif remote is not None:
        found = 'no local index.json yet, so the sample count is not known (Streaming downloads it at start-up)'
    else:
        found = 'NO local index.json and no remote'
        if problems is not None:
            problems.append(f'{phase}: {label} has no MDS shards (index.json) in {local!r} and no remote.')
    return [f'remote {remote or "none"}', f'local {local}: {found}']


def _describe_data(cfg: TrainConfig, problems: list[str]) -> list[str]:
    loader = cfg.train_loader
    phase = cfg.name or phase_run_name(cfg)
    # With prepare_data, train.py converts the data set first, so missing shards are not a problem.
    split_problems = problems if cfg.prepare_data is None else None
    options = ', '.join(f'{key}: {value}' for key, value in loader.transform.options().items())
    lines = [_row('data', f'split {loader.split or "(none)"}, {_plural(loader.views, "view")} per image')]
    lines.append(_row('', f'transform {loader.transform.name} ({options})'))
    workers = _plural(loader.num_workers, 'DataLoader worker')
    lines.append(_row('', f'decoder {loader.decoder}, {workers} per rank'))
    for text in _describe_split('train_loader', loader.remote, str(_train_folder(cfg)), split_problems, phase):
        lines.append(_row('', text))
    if cfg.prepare_data is not None:
        lines.append(_row('', f'prepare_data converts {cfg.prepare_data.source} into {cfg.prepare_data.out} if needed'))

    knn = cfg.callbacks.get('knn_monitor')
    if knn:
        for split in ('train', 'val'):
            local = knn.get(f'{split}_local')
            if not local:
                continue
            # KNNMonitor builds its dataloaders at INIT, so missing shards stop the run there.
            texts = _describe_split(f'knn_monitor {split}', knn.get(f'{split}_remote'), local, problems, phase)
            for position, text in enumerate(texts):
                lines.append(_row(f'knn_monitor {split}' if position == 0 else '', text))
        if knn.get('max_train_samples'):
            lines.append(_row('', f'neighbour bank: the first {knn["max_train_samples"]:,} train samples'))
    return lines


def _describe_parallelism(cfg: TrainConfig, world_size: int) -> list[str]:
    lines = [_row('precision', cfg.precision or 'not set (Composer chooses by device)')]
    lines.append(_row('device', cfg.device or 'not set (GPU when CUDA is available, else CPU)'))
    if cfg.fsdp_config is None:
        mode = 'DDP over the processes' if world_size > 1 else 'one process, no data parallelism'
        lines.append(_row('parallelism', mode))
        return lines
    version = 'FSDP2 (FSDP_VERSION=2)' if os.environ.get('FSDP_VERSION') == '2' else 'FSDP1 (FSDP_VERSION is not 2)'
    settings = ', '.join(f'{key}: {value}' for key, value in cfg.fsdp_config.items())
    lines.append(_row('parallelism', f'{version} with {settings}'))
    if world_size == 1:
        lines.append(_row('', 'NOTE: train.py ignores fsdp_config in a 1-process run, which trains without sharding'))
    return lines


def _describe_components(cfg: TrainConfig) -> list[str]:
    lines = []
    for kind, entries in (('algorithms', cfg.algorithms), ('callbacks', cfg.callbacks), ('loggers', cfg.loggers)):
        if not entries:
            lines.append(_row(kind, 'none'))
            continue
        for position, (entry, kwargs) in enumerate(entries.items()):
            arguments = ', '.join(f'{key}: {value}' for key, value in (kwargs or {}).items())
            lines.append(_row(kind if position == 0 else '', f'{entry} {{{arguments}}}'))
    return lines


def _describe_checkpoints(cfg: TrainConfig) -> list[str]:
    if cfg.save_folder is None:
        return [_row('checkpoints', 'not saved (no save_folder)')]
    folder = cfg.save_folder.format(run_name=phase_run_name(cfg))
    keep = 'all' if cfg.save_num_checkpoints_to_keep < 0 else str(cfg.save_num_checkpoints_to_keep)
    state_dict_type = (cfg.fsdp_config or {}).get('state_dict_type')
    kind = 'sharded' if state_dict_type == 'sharded' else 'one file per save'
    return [
        _row(
            'checkpoints',
            f'{folder}, every {cfg.save_interval} ({kind}, keep {keep}), latest as {cfg.save_latest_filename}, '
            f'autoresume {"on" if cfg.autoresume else "off"}',
        )
    ]
