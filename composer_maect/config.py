"""Training configuration: the schema of a training YAML and its validation.

A YAML is loaded with OmegaConf, merged with ``key=value`` overrides from the command line, resolved (so
``${variables.x}`` interpolations work), stripped of its free-form ``variables`` section, and then checked against the
dataclasses below before anything is built. Every unknown key, wrong type and missing required key is reported at
once, each with its dotted path. An unknown key also gets the closest valid key as a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    'ConfigError',
    'DataLoaderConfig',
    'DecoderConfig',
    'EncoderConfig',
    'InitFromConfig',
    'ModelConfig',
    'OptimizerConfig',
    'PrepareDataConfig',
    'RunFirstConfig',
    'RunPlan',
    'SchedulerConfig',
    'TrainConfig',
    'TransformConfig',
    'load_config',
    'load_run',
    'load_values',
    'phase_configs',
    'validate',
]


class ConfigError(ValueError):
    """An invalid training configuration. The message lists every problem found, one per line."""


# ---------------------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EncoderConfig:
    """A timm Vision Transformer, created by name with fixed 2-D sin-cos position embeddings."""

    name: str
    img_size: int = 224
    patch_size: int | None = None
    in_chans: int = 3
    # Further keyword arguments of timm's VisionTransformer, such as depth, embed_dim, num_heads, drop_path_rate.
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # Compile every transformer block of the encoder with torch.compile. The first steps take longer while it compiles.
    compile_blocks: bool = False


@dataclass
class DecoderConfig:
    """The MAE decoder: a narrow transformer that predicts the pixels of the masked patches."""

    dim: int = 512
    depth: int = 8
    num_heads: int = 16


@dataclass
class InitFromConfig:
    """Encoder weights loaded before training (``composer_maect.checkpoints.load_encoder_weights``).

    ``path`` is a local file or sharded checkpoint folder: a Composer checkpoint of this package, an official MAE or
    MAE-CT file, or a timm state dict. ``weights`` selects the training weights (``raw``) or, from a Composer
    checkpoint of a run with the ``ema`` algorithm, its EMA weights (``ema``). Every encoder tensor must match.
    """

    path: str
    weights: Literal['raw', 'ema'] = 'raw'


@dataclass
class ModelConfig:
    """``mae``: MAE pre-training (encoder and decoder). ``vit_encoder``: the encoder alone, trained by algorithms such
    as ``contrastive_tuning``; ``decoder``, ``mask_ratio`` and ``norm_pix_loss`` then do not apply."""

    encoder: EncoderConfig
    name: Literal['mae', 'vit_encoder'] = 'mae'
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    init_from: InitFromConfig | None = None


@dataclass
class TransformConfig:
    """A view pipeline of ``composer_maect.data.transforms.build_transform``; unset options keep its defaults."""

    name: Literal['mae', 'contrastive', 'contrastive_aug', 'probe_train', 'eval']
    img_size: int
    mean: list[float] | None = None
    std: list[float] | None = None
    scale: list[float] | None = None
    ratio: list[float] | None = None
    hflip: bool | None = None
    interpolation: str | None = None
    resize_size: int | None = None

    def options(self) -> dict[str, Any]:
        """Return the keyword arguments for ``build_transform`` other than ``name``, leaving out unset options."""
        values = dataclasses.asdict(self)
        values.pop('name')
        return {
            key: (tuple(value) if isinstance(value, list) else value)
            for key, value in values.items()
            if value is not None
        }


@dataclass
class DataLoaderConfig:
    """MDS shards read through ``ImageStreamingDataset``: a local folder, optionally filled from a remote."""

    local: str
    transform: TransformConfig
    remote: str | None = None
    split: str | None = None
    views: int = 1
    shuffle: bool = True
    shuffle_seed: int = 9176
    # 'auto': JPEGs with torchvision.io.decode_jpeg, other formats with PIL; 'pil': PIL for every format.
    decoder: Literal['auto', 'pil'] = 'auto'
    num_workers: int = 0
    persistent_workers: bool = False
    pin_memory: bool = False
    prefetch_factor: int | None = None
    drop_last: bool = True
    # Further keyword arguments of streaming.StreamingDataset, such as predownload, cache_limit, download_timeout.
    streaming: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrepareDataConfig:
    """Shards that the trainer builds with the converter before training when ``out`` has none yet."""

    source: str
    out: str
    val_fraction: float | None = None
    seed: int = 0


@dataclass
class OptimizerConfig:
    """``torch.optim.AdamW`` with no weight decay on biases and 1-D parameters.

    The learning rate is ``base_lr × samples / 256``, where ``samples`` is the global batch in images
    (``lr_scaling: images``, the MAE convention) or in views (``lr_scaling: views``, the convention of the official
    MAE-CT code, where both views of an image count), or ``base_lr`` unchanged (``lr_scaling: none``).
    """

    base_lr: float
    name: Literal['adamw'] = 'adamw'
    lr_scaling: Literal['images', 'views', 'none'] = 'images'
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05


@dataclass
class SchedulerConfig:
    """Linear warmup then cosine decay, stepped every batch.

    ``warmup`` is a fraction of the whole run (``0.1``) or a Composer time string (``20ep``, ``500ba``).
    """

    name: Literal['cosine_with_warmup'] = 'cosine_with_warmup'
    warmup: float | str = 0.0
    alpha_f: float = 0.0


@dataclass
class RunFirstConfig:
    """Another training YAML that produces this run's starting point, run first when ``unless_exists`` is missing.

    ``yaml`` is a path relative to the current folder or to the folder of the YAML that names it.
    """

    yaml: str
    unless_exists: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelConfig
    train_loader: DataLoaderConfig
    optimizer: OptimizerConfig
    max_duration: str | int
    global_train_batch_size: int
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    prepare_data: PrepareDataConfig | None = None
    run_name: str | None = None
    seed: int = 17
    device: Literal['cpu', 'gpu'] | None = None
    precision: Literal['fp32', 'amp_fp16', 'amp_bf16', 'amp_fp8'] | None = None
    device_train_microbatch_size: int | None = None
    # Passed to Composer as parallelism_config={'fsdp': fsdp_config}; FSDP2 when the environment has FSDP_VERSION=2.
    fsdp_config: dict[str, Any] | None = None
    algorithms: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    loggers: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    # Stop at the first batch with a NaN or infinite loss, before it is checkpointed (StopOnNonFiniteLoss).
    stop_on_nonfinite_loss: bool = True
    # Python files imported before anything is built, so that they can register algorithms, callbacks and loggers.
    code_paths: list[str] = field(default_factory=list)
    save_folder: str | None = None
    save_interval: str | int = '1ep'
    save_filename: str = 'ep{epoch}-ba{batch}-rank{rank}.pt'
    save_latest_filename: str = 'latest-rank{rank}.pt'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    save_weights_only: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    load_ignore_keys: list[str] | None = None
    progress_bar: bool = False
    log_to_console: bool = True
    console_log_interval: str | int = '1ep'
    python_log_level: str = 'info'
    dist_timeout: float = 300.0
    # The phase name, set inside an entry of the top-level 'phases' list.
    name: str | None = None


@dataclass
class RunPlan:
    """The runs of one YAML: optionally another YAML first, then one or more phases in order.

    A YAML may have a top-level ``phases`` list. Each phase is a mapping with a ``name`` and any top-level keys, which
    are merged over the top level (mappings key by key, other values replaced). Each phase is a separate Trainer run
    named ``{run_name}-{name}`` that starts from the previous phase's final weights.
    """

    phases: list[TrainConfig]
    run_first: RunFirstConfig | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return 'any value'
    if annotation is type(None):
        return 'null'
    if origin is Literal:
        return ' | '.join(repr(value) for value in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return ' | '.join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f'list of {_type_name(typing.get_args(annotation)[0])}'
    if origin is dict:
        return 'mapping'
    if dataclasses.is_dataclass(annotation):
        return 'mapping'
    return getattr(annotation, '__name__', str(annotation))


def _describe(value: Any) -> str:
    if value is None:
        return 'null'
    if isinstance(value, Mapping):
        return 'a mapping'
    if isinstance(value, list | tuple):
        return 'a list'
    return f'{value!r} ({type(value).__name__})'


def _convert(value: Any, annotation: Any, path: str, errors: list[str]) -> Any:
    """Check ``value`` against ``annotation`` and return it converted (ints widened to floats, mappings to
    dataclasses). Problems are appended to ``errors`` and the value is returned unchanged."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            trial: list[str] = []
            converted = _convert(value, arg, path, trial)
            if not trial:
                return converted
        # A single dataclass member (with or without null) reports its own, more precise errors.
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1 and isinstance(value, Mapping):
            return _convert(value, members[0], path, errors)
        errors.append(f"'{path}': invalid value {_describe(value)}; expected {_type_name(annotation)}.")
        return value
    if annotation is type(None):
        if value is not None:
            errors.append(f"'{path}': invalid value {_describe(value)}; expected null.")
        return value
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
            suggestion = f" Did you mean '{hint[0]}'?" if hint else ''
            errors.append(f"'{path}': invalid value {_describe(value)}; expected one of {list(choices)}.{suggestion}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            errors.append(f"'{path}': invalid value {_describe(value)}; expected a mapping.")
            return value
        return _build_dataclass(annotation, value, path, errors)
    if origin is list:
        if not isinstance(value, list | tuple):
            errors.append(f"'{path}': invalid value {_describe(value)}; expected {_type_name(annotation)}.")
            return value
        (item_type,) = typing.get_args(annotation)
        return [_convert(item, item_type, f'{path}[{index}]', errors) for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            errors.append(f"'{path}': invalid value {_describe(value)}; expected a mapping.")
            return value
        _, item_type = typing.get_args(annotation)
        return {key: _convert(item, item_type, f'{path}.{key}', errors) for key, item in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            errors.append(f"'{path}': invalid value {_describe(value)}; expected bool (true or false).")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"'{path}': invalid value {_describe(value)}; expected float.")
            return value
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"'{path}': invalid value {_describe(value)}; expected int.")
        return value
    if annotation is str:
        if not isinstance(value, str):
            errors.append(f"'{path}': invalid value {_describe(value)}; expected str.")
        return value
    raise TypeError(f'Unsupported annotation {annotation!r} at {path!r} in the configuration schema.')


def _build_dataclass(cls: type, values: Mapping[str, Any], path: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f'{path}.' if path else ''
    errors_before = len(errors)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            suggestion = f" Did you mean '{prefix}{close[0]}'?" if close else ''
            errors.append(
                f"'{prefix}{key}': unknown key.{suggestion} Valid keys here: {', '.join(sorted(fields))}. "
                'Put free-form values under the top-level `variables` section.'
            )
            continue
        kwargs[key] = _convert(value, hints[key], f'{prefix}{key}', errors)
    for name, spec in fields.items():
        required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if required and name not in values:
            errors.append(f"'{prefix}{name}': missing required key ({_type_name(hints[name])}).")
    if len(errors) > errors_before:
        return None
    return cls(**kwargs)


def validate(values: Mapping[str, Any], schema: type = TrainConfig) -> Any:
    """Check a plain mapping against a dataclass schema and return the dataclass instance.

    Raises:
        ConfigError: if any key is unknown, missing or of the wrong type; the message lists all of them.
    """
    errors: list[str] = []
    config = _build_dataclass(schema, values, '', errors)
    if errors:
        raise ConfigError('Invalid configuration:\n  ' + '\n  '.join(errors))
    return config


def load_config(path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a training YAML, apply ``key=value`` overrides, resolve interpolations and validate the result.

    Every phase is validated too, merged over the top level (see :func:`phase_configs`).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ConfigError: if an override is malformed or the merged configuration is invalid.
    """
    plan = load_run(path, overrides)
    if len(plan.phases) > 1 or plan.run_first is not None:
        raise ConfigError(f'{path} has phases or run_first: load it with load_run, which returns every phase.')
    return plan.phases[0]


def load_run(path: str, overrides: Sequence[str] = ()) -> RunPlan:
    """Load a training YAML with overrides and validate its phases and its ``run_first`` section."""
    values = load_values(path, overrides)
    run_first = values.get('run_first')
    if run_first is not None:
        errors: list[str] = []
        run_first = _convert(run_first, RunFirstConfig, 'run_first', errors)
        if errors:
            raise ConfigError('Invalid configuration:\n  ' + '\n  '.join(errors))
    return RunPlan(phases=phase_configs(values), run_first=run_first)


def phase_configs(values: Mapping[str, Any]) -> list[TrainConfig]:
    """Return one validated configuration per phase, each the top level with the phase's keys merged over it.

    A configuration without phases is one phase. Mappings merge key by key; lists and other values replace.

    Raises:
        ConfigError: if a phase has no name, two phases share a name, or a merged phase is invalid.
    """
    base = {key: value for key, value in values.items() if key not in ('phases', 'run_first')}
    phases = values.get('phases') or []
    if not phases:
        return [validate(base, TrainConfig)]
    names = []
    configs = []
    for index, phase in enumerate(phases):
        name = phase.get('name') if isinstance(phase, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ConfigError(f"'phases[{index}]': every phase needs a 'name' (for example head_init or tuning).")
        if name in names:
            raise ConfigError(f"'phases[{index}].name': the name {name!r} is used twice.")
        names.append(name)
        merged = OmegaConf.to_container(OmegaConf.merge(base, dict(phase)))
        try:
            configs.append(validate(merged, TrainConfig))
        except ConfigError as error:
            raise ConfigError(str(error).replace('Invalid configuration:', f'Invalid phase {name!r}:', 1)) from None
    return configs


def load_values(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a YAML with overrides and return its resolved values without the ``variables`` section."""
    try:
        yaml_config = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f'{path} is not valid YAML: {error}') from error
    malformed = [override for override in overrides if '=' not in override]
    if malformed:
        raise ConfigError(f'Invalid override(s) {malformed}: write each as key=value, for example max_duration=10ba.')
    if not isinstance(yaml_config, DictConfig):
        raise ConfigError(f'{path} must contain a mapping of keys at the top level.')

    # Phases are addressed by name in overrides (phases.tuning.max_duration=5ep), so the list becomes a mapping while
    # the overrides are merged, then a list again in its original order.
    phases = yaml_config.get('phases')
    phase_names: list[str] = []
    if isinstance(phases, ListConfig):
        phase_names = [
            str(phase.get('name')) if isinstance(phase, DictConfig) else str(i) for i, phase in enumerate(phases)
        ]
        yaml_config.phases = OmegaConf.create(dict(zip(phase_names, phases, strict=True)))
    merged = OmegaConf.merge(yaml_config, OmegaConf.from_dotlist(list(overrides)))
    if phase_names:
        unknown = [name for name in merged.phases if name not in phase_names]
        if unknown:
            raise ConfigError(f'Override of unknown phase(s) {unknown}: the phases of {path} are {phase_names}.')
        merged.phases = [merged.phases[name] for name in phase_names]
    try:
        values = OmegaConf.to_container(merged, resolve=True)
    except Exception as error:  # OmegaConf raises several interpolation error types.
        raise ConfigError(f'Could not resolve the interpolations in {path}: {error}') from error
    values.pop('variables', None)
    return values
