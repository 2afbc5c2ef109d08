"""Train from a YAML: ``python -m composer_maect.train YAML [key=value ...]``.

Also runs under Composer's launcher, one process per device: ``composer -n 8 -m composer_maect.train YAML ...``.
The YAML is validated before anything is built (see ``composer_maect.config``). Then the data, model, optimizer,
schedule, algorithms, callbacks and loggers are built and handed to one ``composer.Trainer``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from composer import ComposerModel, Trainer
from composer.utils import dist, format_name_with_dist, get_device, reproducibility

from composer_maect import registry
from composer_maect.algorithms.contrastive_tuning import HEAD_ATTRIBUTE
from composer_maect.callbacks.nonfinite_loss import NonFiniteLossError, StopOnNonFiniteLoss
from composer_maect.callbacks.resume_rng import restore_rng_mid_epoch
from composer_maect.config import ConfigError, DataLoaderConfig, ModelConfig, TrainConfig, load_run
from composer_maect.data.cache import LocalDirectoryInUseError
from composer_maect.data.dataset import CorruptSampleError
from composer_maect.data.remote import RemoteDataError, check_remotes_on_every_node
from composer_maect.data.shards import ShardError, check_local_shards
from composer_maect.fsdp import average_gloo_gradients, fsdp_settings
from composer_maect.models.vit import check_patch_grid
from composer_maect.optim import build_adamw, build_scheduler, scaled_lr
from composer_maect.remote_checkpoints import remove_stale_autoresume_copy

__all__ = [
    'build_model',
    'build_train_dataloader',
    'check_config',
    'check_phases',
    'final_checkpoint',
    'import_code_paths',
    'main',
    'phase_run_name',
    'run_yaml',
    'train',
]

# Named explicitly: under `python -m composer_maect.train` this module's __name__ is '__main__'.
log = logging.getLogger('composer_maect.train')


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        format=f'%(asctime)s: rank{dist.get_global_rank()}[%(process)d]: %(levelname)s: %(name)s: %(message)s',
    )
    logging.getLogger('composer_maect').setLevel(level.upper())


def import_code_paths(paths: Sequence[str]) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"'code_paths': file {path!r} not found.")
        spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        log.info('Imported %s', path)


def _shards_present(folder: str, split: str | None) -> bool:
    return (Path(folder) / (split or '') / 'index.json').is_file()


def check_config(cfg: TrainConfig, world_size: int, *, require_data: bool = True) -> None:
    """Reject what would fail later, before any data is read or any model is built.

    With ``require_data=False`` missing local shards are not an error (the dry run reports them instead).
    """
    if cfg.global_train_batch_size <= 0 or cfg.global_train_batch_size % world_size:
        raise ConfigError(
            f"'global_train_batch_size' {cfg.global_train_batch_size} must be a positive multiple of the number of "
            f'processes ({world_size}); change it or the process count of `composer -n`.'
        )
    loader = cfg.train_loader
    if loader.views not in (1, 2):
        raise ConfigError(f"'train_loader.views' is {loader.views}; expected 1 or 2.")
    if loader.transform.img_size != cfg.model.encoder.img_size:
        raise ConfigError(
            f"'train_loader.transform.img_size' ({loader.transform.img_size}) differs from 'model.encoder.img_size' "
            f'({cfg.model.encoder.img_size}); set both to the resolution the encoder is trained at.'
        )
    encoder = cfg.model.encoder
    try:
        check_patch_grid(encoder.name, encoder.img_size, encoder.patch_size, encoder.timm_kwargs)
    except ValueError as error:
        raise ConfigError(f"'model.encoder': {error}") from None
    if cfg.fsdp_config is not None:
        fsdp_settings(cfg.fsdp_config)  # raises on keys that the FSDP version chosen by FSDP_VERSION rejects
    if cfg.autoresume and not (cfg.run_name and cfg.save_folder):
        raise ConfigError("'autoresume: true' needs 'run_name' and 'save_folder' so the run can find its checkpoints.")
    has_data = loader.remote is not None or _shards_present(loader.local, loader.split)
    if require_data and not has_data and cfg.prepare_data is None:
        where = Path(loader.local) / (loader.split or '')
        raise ConfigError(
            f"'train_loader.local': no MDS shards (index.json) in {str(where)!r} and no 'train_loader.remote'. "
            'Convert a data set first, for example `python -m composer_maect.data.convert mnist5k ./data/mnist5k '
            "--val-fraction 0.2`, or add a 'prepare_data' section."
        )
    if loader.remote is None and _shards_present(loader.local, loader.split):
        check_local_shards(str(Path(loader.local) / (loader.split or '')))


def _prepare_data(cfg: TrainConfig) -> None:
    """Run the converter once per node when the YAML's prepare_data section names shards that do not exist yet."""
    loader, prepare = cfg.train_loader, cfg.prepare_data
    if prepare is None or loader.remote is not None or _shards_present(loader.local, loader.split):
        return
    if dist.get_local_rank() == 0:
        from composer_maect.data.convert import convert

        log.info('No shards in %s: converting %s into %s', loader.local, prepare.source, prepare.out)
        convert(prepare.source, prepare.out, val_fraction=prepare.val_fraction, seed=prepare.seed)
    dist.barrier()
    if not _shards_present(loader.local, loader.split):
        raise ConfigError(
            f"'prepare_data' wrote {prepare.out!r}, but 'train_loader.local' ({loader.local!r}, split "
            f'{loader.split!r}) still has no index.json; point train_loader.local at the converted split.'
        )


def build_model(cfg: ModelConfig, *, load_weights: bool = True) -> ComposerModel:
    """Build the ``ComposerModel`` that a model section describes, with ``init_from`` weights when ``load_weights``."""
    from composer_maect.checkpoints import load_encoder_weights
    from composer_maect.models.encoder_model import ViTEncoderModel
    from composer_maect.models.mae import MAEModel
    from composer_maect.models.vit import compile_encoder_blocks, create_encoder

    encoder = create_encoder(
        cfg.encoder.name,
        img_size=cfg.encoder.img_size,
        patch_size=cfg.encoder.patch_size,
        in_chans=cfg.encoder.in_chans,
        **cfg.encoder.timm_kwargs,
    )
    if load_weights and cfg.init_from is not None:
        try:
            load_encoder_weights(encoder, cfg.init_from.path, weights=cfg.init_from.weights)
        except ValueError as error:
            raise ConfigError(f"'model.init_from': {error}") from None
    if cfg.encoder.compile_blocks:
        compile_encoder_blocks(encoder)
    if cfg.name == 'vit_encoder':
        return ViTEncoderModel(encoder)
    return MAEModel(
        encoder,
        mask_ratio=cfg.mask_ratio,
        decoder_dim=cfg.decoder.dim,
        decoder_depth=cfg.decoder.depth,
        decoder_num_heads=cfg.decoder.num_heads,
        norm_pix_loss=cfg.norm_pix_loss,
    )


def _check_checkpoint_to_load(
    cfg: TrainConfig, model: ComposerModel, run_name: str | None, save_folder: str | None, load_path: str | None
) -> None:
    """Reject a local checkpoint of another architecture before the Trainer loads it.

    As in Composer, the checkpoint that ``autoresume`` finds in ``save_folder`` takes precedence over ``load_path``.
    Remote paths and paths that do not exist are left to Composer.
    """
    from composer_maect.checkpoint_match import check_trainer_checkpoint

    key, path = None, None
    if cfg.autoresume and save_folder and '://' not in save_folder:
        # As in Composer's autoresume, every rank looks for rank 0's latest link.
        latest = Path(format_name_with_dist(save_folder, run_name)) / cfg.save_latest_filename.format(rank=0)
        if latest.exists():
            key, path = 'autoresume', latest
    if path is None and load_path and '://' not in load_path and Path(load_path).exists():
        key, path = 'load_path', Path(load_path)
    if path is None:
        return
    try:
        check_trainer_checkpoint(model, path, ignore_keys=cfg.load_ignore_keys, strict=cfg.load_strict_model_weights)
    except ValueError as error:
        raise ConfigError(f"'{key}': {error}") from None


def build_train_dataloader(cfg: DataLoaderConfig, device_batch_size: int):
    """Build the training ``DataLoader`` over MDS shards for one rank."""
    from composer_maect.data.cache import prepare_local_directory
    from composer_maect.data.dataset import build_image_dataloader
    from composer_maect.data.transforms import build_transform

    # Removes the shared memory of a killed run on this local directory, and rejects a second run on the same cache.
    prepare_local_directory(cfg.local, cfg.split, remote=cfg.remote)
    transform = build_transform(cfg.transform.name, **cfg.transform.options())
    return build_image_dataloader(
        local=cfg.local,
        remote=cfg.remote,
        split=cfg.split,
        batch_size=device_batch_size,
        views=cfg.views,
        transform=transform,
        shuffle=cfg.shuffle,
        shuffle_seed=cfg.shuffle_seed,
        decoder=cfg.decoder,
        num_workers=cfg.num_workers,
        drop_last=cfg.drop_last,
        persistent_workers=cfg.persistent_workers,
        pin_memory=cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor,
        streaming_kwargs=cfg.streaming,
    )


def train(cfg: TrainConfig, *, previous: TrainConfig | None = None) -> Trainer:
    """Build everything that ``cfg`` describes, run ``Trainer.fit()`` and return the trainer (closed).

    Args:
        cfg: one phase, or the whole run when it has no phases.
        previous: the phase before ``cfg``; its final checkpoint is loaded (weights only) when ``cfg`` has no
            checkpoint of its own to resume from.
    """
    _setup_logging(cfg.python_log_level)
    import_code_paths(cfg.code_paths)
    device = get_device(cfg.device)
    world_size = dist.get_world_size()  # from the launcher's WORLD_SIZE, 1 without a launcher
    # A 1-process run needs no process group, so none is left behind when train() is called in-process.
    if world_size > 1 and not dist.is_initialized():
        dist.initialize_dist(device, cfg.dist_timeout)
    check_config(cfg, world_size)
    _prepare_data(cfg)
    check_remotes_on_every_node(cfg.train_loader.remote, cfg.train_loader.split, cfg.save_folder)

    run_name, save_folder, load_path = cfg.run_name, cfg.save_folder, cfg.load_path
    load_weights_only = cfg.load_weights_only
    if cfg.name is not None:
        run_name = f'{cfg.run_name}-{cfg.name}'
    load_ignore_keys = cfg.load_ignore_keys
    if previous is not None:
        load_path = final_checkpoint(previous)
        load_weights_only = True
        # A head with an EMA target projector starts it from the previous phase's projector: the target keys are
        # left out of the load (a sharded load would require them) and filled from the projector keys.
        load_ignore_keys = [*(cfg.load_ignore_keys or []), f'state/model/{HEAD_ATTRIBUTE}.head.target_projector*']
        log.info('Phase %s starts from the weights of phase %s (%s)', cfg.name, previous.name, load_path)

    device_batch_size = cfg.global_train_batch_size // world_size
    reproducibility.seed_all(cfg.seed)
    model = build_model(cfg.model, load_weights=previous is None)
    if previous is None:
        _check_checkpoint_to_load(cfg, model, run_name, save_folder, load_path)
    lr = scaled_lr(cfg.optimizer.base_lr, cfg.global_train_batch_size, cfg.train_loader.views, cfg.optimizer.lr_scaling)
    optimizer = build_adamw(
        model, lr=lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay
    )
    scheduler = build_scheduler(cfg.scheduler.warmup, cfg.scheduler.alpha_f)
    train_dataloader = build_train_dataloader(cfg.train_loader, device_batch_size)

    if cfg.autoresume and save_folder is not None:
        remove_stale_autoresume_copy(save_folder, cfg.save_latest_filename, run_name)

    parallelism_config = None
    if cfg.fsdp_config is not None:
        if world_size > 1:
            parallelism_config = {'fsdp': fsdp_settings(cfg.fsdp_config)}
        else:
            warnings.warn('fsdp_config is ignored in a 1-process run, which trains without sharding.', stacklevel=1)

    log.info(
        'Training %s: %s parameters (%s trainable), global batch %d (%d per rank on %d ranks), lr %.3g, for %s',
        type(model).__name__,
        f'{sum(p.numel() for p in model.parameters()):,}',
        f'{sum(p.numel() for p in model.parameters() if p.requires_grad):,}',
        cfg.global_train_batch_size,
        device_batch_size,
        world_size,
        lr,
        cfg.max_duration,
    )
    callbacks = registry.build('callbacks', cfg.callbacks)
    if cfg.stop_on_nonfinite_loss and not any(isinstance(callback, StopOnNonFiniteLoss) for callback in callbacks):
        # First, so that no other callback acts on a batch with a NaN loss at BATCH_END.
        callbacks.insert(0, StopOnNonFiniteLoss())
    trainer = Trainer(
        run_name=run_name,
        seed=cfg.seed,
        model=model,
        train_dataloader=train_dataloader,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        max_duration=cfg.max_duration,
        device=device,
        precision=cfg.precision,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config=parallelism_config,
        algorithms=registry.build('algorithms', cfg.algorithms),
        callbacks=callbacks,
        loggers=registry.build('loggers', cfg.loggers),
        progress_bar=cfg.progress_bar,
        log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
        save_folder=save_folder,
        save_interval=cfg.save_interval,
        save_filename=cfg.save_filename,
        save_latest_filename=cfg.save_latest_filename,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        save_weights_only=cfg.save_weights_only,
        autoresume=cfg.autoresume,
        load_path=load_path,
        load_weights_only=load_weights_only,
        load_strict_model_weights=cfg.load_strict_model_weights,
        load_ignore_keys=load_ignore_keys,
        python_log_level=cfg.python_log_level,
        dist_timeout=cfg.dist_timeout,
    )
    if parallelism_config is not None:
        average_gloo_gradients(trainer.state.model)
    restore_rng_mid_epoch(trainer)
    try:
        max_duration = trainer.state.max_duration
        if max_duration is not None and trainer.state.timestamp.get(max_duration.unit) >= max_duration:
            # Composer rejects fit() on a run that autoresume restored at its end.
            log.info('Run %s is already finished at %s: nothing to train', run_name, max_duration)
        else:
            trainer.fit()
    finally:
        trainer.close()
    log.info('Finished training at %s', trainer.state.timestamp.batch)
    return trainer


def phase_run_name(cfg: TrainConfig) -> str:
    return f'{cfg.run_name}-{cfg.name}' if cfg.name is not None else str(cfg.run_name)


def final_checkpoint(cfg: TrainConfig) -> str:
    """Return the path of the latest checkpoint that phase ``cfg`` saves.

    Only rank 0 writes the ``latest`` link, for monolithic and sharded checkpoints alike, so every rank reads rank 0's
    link. In an object store Composer saves the link as a ``.symlink`` object that names the checkpoint.
    """
    folder = cfg.save_folder.format(run_name=phase_run_name(cfg))
    path = f'{folder}/{cfg.save_latest_filename.format(rank=0)}'
    return f'{path}.symlink' if '://' in folder else path


def check_phases(phases: list[TrainConfig]) -> None:
    if len(phases) < 2:
        return
    for cfg in phases:
        if not cfg.run_name or not cfg.save_folder or '{run_name}' not in cfg.save_folder:
            raise ConfigError(
                f"Phase {cfg.name!r}: a run with phases needs 'run_name' and a 'save_folder' that contains "
                "'{run_name}', so that every phase saves its own checkpoints and the next phase finds them."
            )


def _resolve_yaml(path: str, relative_to: str) -> str:
    if os.path.isfile(path):
        return path
    candidate = Path(relative_to).parent / path
    if candidate.is_file():
        return str(candidate)
    raise ConfigError(f"'run_first.yaml': file {path!r} not found in the current folder or next to {relative_to!r}.")


def run_yaml(path: str, overrides: Sequence[str] = ()) -> list[Trainer]:
    """Run everything one YAML describes: its ``run_first`` YAML when needed, then each phase in order."""
    plan = load_run(path, overrides)
    if plan.run_first is not None and not Path(plan.run_first.unless_exists).exists():
        first = _resolve_yaml(plan.run_first.yaml, path)
        log.info('%s not found: running %s first', plan.run_first.unless_exists, first)
        run_yaml(first, plan.run_first.overrides)
        if not Path(plan.run_first.unless_exists).exists():
            raise ConfigError(
                f"'run_first': {first} finished but did not produce {plan.run_first.unless_exists!r}; make "
                'run_first.unless_exists the checkpoint that it saves.'
            )
    check_phases(plan.phases)
    trainers = []
    previous = None
    for cfg in plan.phases:
        if cfg.name is not None:
            log.info('Starting phase %s', cfg.name)
        trainers.append(train(cfg, previous=previous))
        previous = cfg
    _log_knn_summary(plan.phases, trainers)
    return trainers


def _log_knn_summary(phases: list[TrainConfig], trainers: list[Trainer]) -> None:
    """Log the k-NN accuracy before the first phase and after each phase, when a KNNMonitor measured it."""
    from composer_maect.callbacks import KNNMonitor

    lines = []
    for index, (cfg, trainer) in enumerate(zip(phases, trainers, strict=True)):
        monitor = next((cb for cb in trainer.state.callbacks if isinstance(cb, KNNMonitor)), None)
        if monitor is None or not monitor.last_results:
            continue
        label = cfg.name or 'training'
        if index == 0 and monitor.first_results:
            lines.append(f'  before {label:<12} {_format_knn(monitor.first_results)}')
        lines.append(f'  after {label:<13} {_format_knn(monitor.last_results)}')
    if lines and dist.get_global_rank() == 0:
        log.info('k-NN accuracy of the encoder on the held-out split:\n%s', '\n'.join(lines))


def _format_knn(results: dict[str, float]) -> str:
    top1 = {name.split('@')[1]: value for name, value in results.items() if name.startswith('knn/top1@')}
    weights = 'EMA weights' if results.get('knn/uses_ema') else 'training weights'
    accuracies = ', '.join(f'top-1 {100 * value:.1f}% (k={k})' for k, value in top1.items())
    return f'{accuracies} [{weights}]'


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m composer_maect.train',
        description='Train from a YAML configuration. Arguments after the YAML override its keys.',
    )
    parser.add_argument('yaml', help='path to the training YAML')
    parser.add_argument('overrides', nargs='*', help='key=value overrides with dotted keys, e.g. max_duration=10ba')
    parser.add_argument(
        '--dry-run',
        action='store_true',
        help='build each phase on the meta device and print its parameters, learning rates, FLOPs and data, '
        'without reading data or training',
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for an invalid configuration, 1 for bad data or a NaN loss)."""
    args = _parse_args(argv)
    if not os.path.isfile(args.yaml):
        print(f'error: YAML file {args.yaml!r} not found.', file=sys.stderr)
        return 2
    try:
        if args.dry_run:
            from composer_maect.dry_run import describe_run

            print(describe_run(load_run(args.yaml, args.overrides)))
        else:
            run_yaml(args.yaml, args.overrides)
    except (ConfigError, RemoteDataError, LocalDirectoryInUseError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except (ShardError, CorruptSampleError, NonFiniteLossError) as error:
        # Bad data or a diverged run: the message names the file, sample or batch and what to do.
        print(f'error: {error}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
