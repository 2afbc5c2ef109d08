"""Encoder and NNCLR head weights from the checkpoint formats of MAE, MAE-CT, timm and this package.

Readable sources:

* official MAE files ``{'model': state_dict}``, encoder-only or ``_full`` with the decoder, and the state dicts of
  timm's ``vit_*_patch*_224.mae`` models (the same keys without the wrapper). Their ``pos_embed`` is ``[1, 1 + N, D]``
  with a CLS row.
* official MAE-CT files ``{'state_dict': ..., 'ctor_kwargs': ...}`` and its flat EMA dicts. Their ``pos_embed`` is
  ``[1, N, D]`` without a CLS row. Its NNCLR head stores the queue as ``queue``, ``queue_y``, ``queue_id``,
  ``queue_ptr``.
* this package's Composer checkpoints: a full ``.pt`` file, or a sharded folder (``.metadata`` and ``__*_0.distcp``)
  as Composer writes it under FSDP. Either contains the raw weights and, when Composer's ``EMA`` algorithm ran, the
  EMA weights.
* ``.safetensors`` files, such as those that ``python -m composer_maect.export`` writes.

No file is unpickled without restriction. Pickled files go through ``torch.load(weights_only=True)`` with the few
extra types that Composer checkpoints contain (time stamps, the torch version, NumPy random states). A sharded folder is
read with ``torch.distributed.checkpoint`` on the CPU without a process group, with a restricted unpickler for its
``.metadata`` file and ``weights_only=True`` for its non-tensor entries.

An encoder load requires every tensor of the ViT to match by name and shape. Two differences are adapted first: a
position embedding without a CLS row gets one, and a position embedding of another patch grid is resampled (see
:func:`adapt_encoder_state_dict`).
"""

from __future__ import annotations

import datetime
import io
import logging
import math
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from composer_maect.models.pos_embed import get_2d_sincos_pos_embed

__all__ = [
    'ENCODER_PREFIXES',
    'adapt_encoder_state_dict',
    'check_encoder_weights',
    'describe_format',
    'extract_encoder_state_dict',
    'extract_head_state_dict',
    'has_ema_weights',
    'load_checkpoint_file',
    'load_encoder_weights',
    'load_head_weights',
    'match_sincos_grid',
    'select_weights',
    'split_pos_embed',
]

log = logging.getLogger(__name__)

Weights = Literal['raw', 'ema']
WEIGHTS = ('raw', 'ema')

# Prefixes under which a ViT's keys appear in the files this package reads. The ViT is found under any prefix; when
# several ViTs are present, the first of these prefixes that has one wins.
ENCODER_PREFIXES = ('encoder.vit.', 'encoder.', 'model.', 'backbone.', '')
# Module names that wrappers insert into parameter names: DDP (leading only), FSDP1, activation checkpointing and
# torch.compile.
_WRAPPER_PARTS = ('_fsdp_wrapped_module.', '_checkpoint_wrapped_module.', '_orig_mod.')
_PROBE_KEYS = ('cls_token', 'patch_embed.proj.weight')
# Keys of the MAE decoder stored next to the encoder without a prefix, as in official ``_full`` files, and this
# package's head. An encoder load drops them by name.
_NON_ENCODER_KEYS = re.compile(r'^(decoder[._]|mask_token$|maect_head\.)')

# Head keys in the official MAE-CT layout mapped to this package's ContrastiveHead layout.
_OFFICIAL_QUEUE_KEYS = {
    'queue': 'queue.queue',
    'queue_y': 'queue.queue_labels',
    'queue_id': 'queue.queue_ids',
    'queue_ptr': 'queue.queue_ptr',
}
_HEAD_PARTS = ('projector.', 'predictor.', 'target_projector.')

# Name under which Composer stores its EMA algorithm's state in ``state['algorithms']``.
_COMPOSER_EMA = 'EMA'


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------


def _safe_globals() -> list:
    numpy_dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType')]
    # NumPy 2 moved numpy.core to numpy._core; both names refer to the same function.
    numpy_core = getattr(np, '_core', None) or np.core
    return [
        datetime.timedelta,
        torch.torch_version.TorchVersion,
        numpy_core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        *numpy_dtypes,
    ]


def _pickle_rejection(path: Path, error: Exception) -> ValueError:
    match = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(error))
    found = f' (it contains the type {match.group(1)})' if match else ''
    if match and 'DTensor' in match.group(1):
        # NOTE: untested, because no FSDP2 checkpoint with EMA state was written here. Composer's EMA algorithm
        # under FSDP2 keeps DTensor shards, and a sharded checkpoint keeps rank 0's algorithm state only.
        return ValueError(
            f'Checkpoint {str(path)!r} stores algorithm state as FSDP2 DTensor shards, which cannot be read back as '
            'full weights outside the training job. Save the checkpoint with FSDP1 or without FSDP, or resume the '
            'run and save a full checkpoint (fsdp_config.state_dict_type: full).'
        )
    return ValueError(
        f'Checkpoint {str(path)!r} contains objects other than tensors and plain containers{found}, and unpickling '
        'them could run arbitrary code, so it was not loaded. Convert it once in an environment you trust: load it '
        "with torch.load(path, weights_only=False) and save only its tensors, for example torch.save({'model': "
        "model.state_dict()}, 'weights.pth')."
    )


def _torch_load(source: Path | io.BytesIO, path: Path, *, mmap: bool = False) -> Any:
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(source, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # A type outside the allowlist is a rejection; other weights-only failures mean the data is not a pickle.
        if 'Unsupported global' in str(error):
            raise _pickle_rejection(path, error) from error
        raise _unreadable(path, error) from error
    except (EOFError, KeyError, OSError, RuntimeError) as error:
        if mmap and 'mmap' in str(error):
            raise
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> ValueError:
    detail = re.search(r'WeightsUnpickler error: ([^\n]+)', str(error))
    reason = detail.group(1) if detail else f'{type(error).__name__}: {error}'
    return ValueError(
        f'Checkpoint {str(path)!r} could not be read by torch.load ({reason}). Check that the '
        'file is complete and was written by torch.save, or pass a .safetensors file or a sharded checkpoint folder.'
    )


def load_checkpoint_file(path: str | Path, *, mmap: bool = False) -> dict:
    """Load a checkpoint without arbitrary unpickling: a pickled file, a ``.safetensors`` file or a sharded folder.

    A folder (or its ``.metadata`` file, or a link to it such as Composer's ``latest-rank0.pt``) is read as a
    sharded Composer checkpoint. Only its model weights and algorithm states are read, as
    ``{'state': {'model': ..., 'algorithms': ...}}``.

    Args:
        path: The file or folder.
        mmap: Map pickled files into memory instead of reading them, so that tensors are read on first use. Sharded
            folders are always read.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file needs arbitrary unpickling, or a sharded folder is not a Composer checkpoint.
    """
    path = Path(path)
    if path.name == '.metadata':
        path = path.parent
    if path.is_dir():
        return _read_sharded_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {str(path)!r} not found.')
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device='cpu')
        except SafetensorError as error:
            raise ValueError(
                f'Safetensors file {str(path)!r} is invalid ({error}). Check that it is complete.'
            ) from error
    try:
        return _torch_load(path, path, mmap=mmap)
    except RuntimeError as error:
        # Files in torch's legacy (pre-zip) format cannot be memory-mapped; read them instead.
        if not mmap or 'mmap' not in str(error):
            raise
        return _torch_load(path, path)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata`` files that only creates DCP's metadata classes and torch's type objects."""

    _DCP_MODULES = ('torch.distributed.checkpoint.metadata', 'torch.distributed.checkpoint.filesystem')
    # Plain values that DCP's metadata contains: torch.Size, layouts (rebuilt from their name by
    # torch.serialization._get_layout) and the checkpoint path in StorageMeta.
    _ALLOWED = {
        ('collections', 'OrderedDict'),
        ('torch', 'Size'),
        ('torch.serialization', '_get_layout'),
        ('pathlib', 'Path'),
        ('pathlib', 'PosixPath'),
        ('pathlib', 'WindowsPath'),
        ('pathlib', 'PurePosixPath'),
        ('pathlib', 'PureWindowsPath'),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module in self._DCP_MODULES or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == 'torch' and isinstance(
            getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f'Sharded checkpoint metadata refers to {module}.{name}, which is not a type of '
            'torch.distributed.checkpoint metadata.'
        )


def _read_sharded_checkpoint(folder: Path, *, tensor_filter: Callable[[tuple], bool] | None = None) -> dict:
    """Read the model and algorithm states of a sharded Composer checkpoint into full tensors on the CPU.

    Tensors whose object path fails ``tensor_filter`` are not read: they come back as meta tensors of the saved shape.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not (folder / '.metadata').is_file():
        raise ValueError(
            f'Checkpoint folder {str(folder)!r} has no .metadata file, so it is not a sharded checkpoint written by '
            'torch.distributed.checkpoint. Pass a checkpoint file or the folder that Composer wrote.'
        )

    class SafeReader(FileSystemReader):
        def read_metadata(self):
            with open(folder / '.metadata', 'rb') as file:
                try:
                    metadata = _MetadataUnpickler(file).load()
                except pickle.UnpicklingError as error:
                    raise ValueError(f'Sharded checkpoint {str(folder)!r} has unexpected metadata: {error}') from error
            if getattr(metadata, 'storage_meta', None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    skipped: dict[tuple, torch.Tensor] = {}

    class SelectivePlanner(DefaultLoadPlanner):
        """Builds the state dict from the metadata, keeping the model weights and algorithm states only."""

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            for fqn, item in metadata.state_dict_metadata.items():
                object_path = tuple(metadata.planner_data.get(fqn, (fqn,)))
                if object_path[:1] != ('state',) or object_path[1:2] not in (('model',), ('algorithms',)):
                    continue
                if isinstance(item, TensorStorageMetadata):
                    if tensor_filter is not None and not tensor_filter(object_path):
                        skipped[object_path] = torch.empty(item.size, dtype=item.properties.dtype, device='meta')
                        continue
                    item = torch.empty(item.size, dtype=item.properties.dtype)
                set_element(state_dict, object_path, item)
            super().set_up_planner(state_dict, metadata, is_coordinator)

        def load_bytes(self, read_item, value):
            loaded = _torch_load(value, folder)
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)

    state_dict: dict = {}
    try:
        _load_state_dict(state_dict, storage_reader=SafeReader(folder), planner=SelectivePlanner(), no_dist=True)
    except CheckpointException as error:
        # DCP wraps every failure; re-raise a rejection of this module's checks as it is.
        for failure, _ in error.failures.values():
            if isinstance(failure, ValueError):
                raise failure from error
        raise
    for object_path, tensor in skipped.items():
        set_element(state_dict, object_path, tensor)
    if 'model' not in state_dict.get('state', {}):
        raise ValueError(
            f'Sharded checkpoint {str(folder)!r} has no model weights under state.model, so it was not written by '
            "Composer's Trainer."
        )
    return state_dict


# ---------------------------------------------------------------------------------------------------------------------
# Raw and EMA weights
# ---------------------------------------------------------------------------------------------------------------------


def _flatten(tree: Mapping, prefix: str = '') -> dict[str, torch.Tensor]:
    """Return the tensors of nested mappings under dotted keys (``{'a': {'b': t}}`` -> ``{'a.b': t}``)."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            flat[prefix + str(key)] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f'{prefix}{key}.'))
    return flat


def _strip_wrappers(key: str) -> str:
    for part in _WRAPPER_PARTS:
        key = key.replace(part, '')
    return key.removeprefix('module.')


def _clean(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_strip_wrappers(key): value for key, value in state.items()}


def _composer_state(checkpoint: Mapping) -> Mapping | None:
    state = checkpoint.get('state')
    if isinstance(state, Mapping) and isinstance(state.get('model'), Mapping):
        return state
    return None


def _composer_ema(state: Mapping) -> Mapping | None:
    """Return the state of Composer's EMA algorithm once it has started averaging, else ``None``."""
    for entry in state.get('algorithms') or ():
        if isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] == _COMPOSER_EMA:
            ema = entry[1]
            if isinstance(ema, Mapping) and ema.get('ema_started') and isinstance(ema.get('ema_model'), Mapping):
                return ema
    return None


def _is_dtensor(value: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return False
    return isinstance(value, DTensor)


def has_ema_weights(checkpoint: Mapping) -> bool:
    """Return whether a loaded checkpoint is a Composer checkpoint with the weights of a started ``EMA`` algorithm."""
    state = _composer_state(checkpoint)
    return state is not None and _composer_ema(state) is not None


def describe_format(checkpoint: Mapping) -> str:
    """Name the layout of a loaded checkpoint, for messages."""
    if _composer_state(checkpoint) is not None:
        return 'Composer checkpoint'
    if isinstance(checkpoint.get('state_dict'), Mapping):
        return "MAE-CT file {'state_dict': ...}"
    if isinstance(checkpoint.get('model'), Mapping):
        return "MAE file {'model': ...}"
    return 'state dict'


def select_weights(checkpoint: Mapping, weights: Weights = 'raw') -> dict[str, torch.Tensor]:
    """Return all model tensors of a loaded checkpoint as one flat dict, with wrapper names removed from the keys.

    Composer's ``EMA`` algorithm swaps its weights into the model before every checkpoint save and records that in
    ``ema_weights_active``. The model section then contains the EMA weights and the algorithm state
    (``state['algorithms']``, entry ``('EMA', {'ema_model': {'named_parameters_dict', 'named_buffers_dict'}, ...})``)
    contains the training weights, or the other way round when the flag is false. This function undoes that swap:
    ``'raw'`` returns the training weights and ``'ema'`` the EMA weights. The EMA covers only the parameters that
    required gradients, so frozen parameters are the same in both.

    Args:
        checkpoint: A loaded checkpoint: a Composer checkpoint, an ``{'model': ...}`` or ``{'state_dict': ...}``
            wrapper, or a state dict. Nested dicts are flattened with dotted keys.
        weights: ``'raw'`` or ``'ema'``. Only Composer checkpoints have EMA weights.

    Raises:
        ValueError: If ``weights`` is invalid, or ``'ema'`` is requested from a checkpoint without EMA weights.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"Invalid weights {weights!r}: expected 'raw' (the training weights) or 'ema'.")
    state = _composer_state(checkpoint)
    if state is None:
        if weights == 'ema':
            raise ValueError(
                f'EMA weights were requested, but this {describe_format(checkpoint)} contains one set of weights. '
                "Only Composer checkpoints of runs with the 'ema' algorithm have separate EMA weights; load this file "
                "with weights='raw' (an official MAE-CT EMA file is loaded that way too)."
            )
        for wrapper in ('state_dict', 'model'):
            if isinstance(checkpoint.get(wrapper), Mapping):
                return _clean(_flatten(checkpoint[wrapper]))
        return _clean(_flatten(checkpoint))

    model = _clean(_flatten(state['model']))
    ema = _composer_ema(state)
    if ema is None:
        if weights == 'ema':
            raise ValueError(
                "EMA weights were requested, but this Composer checkpoint has none: the 'ema' algorithm was not "
                "used or had not started averaging. Use weights='raw', or a checkpoint of a run with the 'ema' "
                'algorithm.'
            )
        return model
    swapped_in = bool(ema.get('ema_weights_active', False))
    if swapped_in == (weights == 'ema'):
        return model
    stored = ema['ema_model']
    other = {
        **_clean(dict(stored.get('named_parameters_dict') or {})),
        **_clean(dict(stored.get('named_buffers_dict') or {})),
    }
    sharded = [key for key, value in other.items() if _is_dtensor(value)]
    if sharded:
        # Composer 0.32.1 pickles algorithm state, so a checkpoint of Composer's own EMA under FSDP2 keeps one rank's
        # shard of it (rank 0's). The package's EMA stores full tensors instead.
        available = 'ema' if swapped_in else 'raw'
        raise ValueError(
            f'The {weights!r} weights of this checkpoint are in the EMA algorithm state as FSDP2 DTensor shards of one '
            f'rank only (for example {sharded[0]}), so they cannot be rebuilt in full. The checkpoint holds the '
            f"{available!r} weights in full: load those with weights={available!r}. Runs with the package's `ema` "
            'algorithm (composer_maect.algorithms.EMA) store both in full.'
        )
    unknown = sorted(set(other) - set(model))
    if unknown:
        raise ValueError(
            f'The EMA algorithm state has tensors that the model section lacks, for example {unknown[:5]}, so the '
            'checkpoint is inconsistent.'
        )
    return {**model, **other}


# ---------------------------------------------------------------------------------------------------------------------
# Encoder keys
# ---------------------------------------------------------------------------------------------------------------------


def _find_prefix(keys: Iterable[str], suffixes: tuple[str, ...], preferred: tuple[str, ...], component: str) -> str:
    keys = set(keys)
    first, *rest = suffixes
    candidates = sorted(
        key[: -len(first)]
        for key in keys
        if key.endswith(first) and all(key[: -len(first)] + suffix in keys for suffix in rest)
    )
    # A key such as 'target_projector.0.weight' also ends with 'projector.0.weight'; keep whole module names only.
    candidates = [prefix for prefix in candidates if prefix == '' or prefix.endswith('.')]
    if not candidates:
        sample = sorted(keys)[:8]
        raise ValueError(
            f'No {component} weights found: expected keys ending with {list(suffixes)}; the first keys are {sample}.'
        )
    if len(candidates) == 1:
        return candidates[0]
    for prefix in preferred:
        if prefix in candidates:
            return prefix
    raise ValueError(f'Found {component} weights under several prefixes {candidates}; keep one model per checkpoint.')


def extract_encoder_state_dict(checkpoint: Mapping, *, weights: Weights = 'raw') -> dict[str, torch.Tensor]:
    """Return the ViT tensors of a loaded checkpoint, without their prefix and without the MAE decoder.

    The ViT is found by its ``cls_token`` and ``patch_embed.proj.weight`` keys under any prefix (``encoder.vit.`` of
    this package's MAE model, ``encoder.`` of its encoder model and of MAE-CT's composite models, ``model.``,
    ``backbone.``, none). Wrapper names (``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``) are removed first.
    Keys of official ``_full`` files that belong to the decoder (``mask_token``, ``decoder_*``) are dropped.

    Raises:
        ValueError: If no ViT is found, it is found under several prefixes, or ``weights`` cannot be served (see
            :func:`select_weights`).
    """
    state = select_weights(checkpoint, weights)
    prefix = _find_prefix(state, _PROBE_KEYS, ENCODER_PREFIXES, 'ViT')
    encoder = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return {key: value for key, value in encoder.items() if not _NON_ENCODER_KEYS.match(key)}


# ---------------------------------------------------------------------------------------------------------------------
# Position embeddings
# ---------------------------------------------------------------------------------------------------------------------


def match_sincos_grid(table: torch.Tensor) -> tuple[int, int] | None:
    """Return the grid ``(height, width)`` whose fixed 2-D sin-cos table equals ``table`` ``[N, D]``, else ``None``.

    Every factorisation ``height * width = N`` is tried, so non-square grids are found too. The tolerance is 1e-4 for
    32- and 64-bit tables and 1e-2 for 16-bit ones.
    """
    if table.device.type == 'meta' or table.dim() != 2 or table.shape[1] % 4 != 0 or table.shape[0] == 0:
        return None
    tolerance = 1e-2 if table.element_size() <= 2 else 1e-4
    values = table.detach().double()
    tokens, dim = table.shape
    for height in range(1, tokens + 1):
        if tokens % height:
            continue
        grid = (height, tokens // height)
        reference = get_2d_sincos_pos_embed(dim, grid).double()
        if (reference - values).abs().max().item() <= tolerance:
            return grid
    return None


def _square_side(count: int) -> int | None:
    side = math.isqrt(count)
    return side if side * side == count else None


def split_pos_embed(
    pos_embed: torch.Tensor, model_grid: tuple[int, int] | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, int], bool]:
    """Split a checkpoint's ``pos_embed`` ``[1, T, D]`` into its CLS row and its patch rows, and find their grid.

    A fixed sin-cos table is recognised by its values, with or without a CLS row and for any grid. A learned table
    whose ``T - 1`` rows form a square is a square grid after a CLS row, and one whose ``T`` rows do is a square grid
    without one. Otherwise a learned table with the token count of ``model_grid`` is taken to have that grid.

    NOTE: a learned table stores no grid, so one of a non-square grid whose token count is square (2x8 = 16) is
    taken as square (4x4). The official MAE, MAE-CT and timm checkpoints are square, and this package's tables are
    sin-cos tables, whose grid is found exactly.

    Returns:
        ``(cls_row [1, 1, D] or None, patch_rows [1, N, D], grid, is_sincos)``.

    Raises:
        ValueError: If the grid cannot be determined.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f'pos_embed must have shape [1, tokens, dim], got {tuple(pos_embed.shape)}.')
    rows = pos_embed.shape[1]
    if rows > 1:
        grid = match_sincos_grid(pos_embed[0, 1:])
        if grid is not None:
            return pos_embed[:, :1], pos_embed[:, 1:], grid, True
    grid = match_sincos_grid(pos_embed[0])
    if grid is not None:
        return None, pos_embed, grid, True

    side = _square_side(rows - 1) if rows > 1 else None
    if side is not None:
        return pos_embed[:, :1], pos_embed[:, 1:], (side, side), False
    side = _square_side(rows)
    if side is not None:
        return None, pos_embed, (side, side), False
    if model_grid is not None:
        count = model_grid[0] * model_grid[1]
        if rows == count + 1:
            return pos_embed[:, :1], pos_embed[:, 1:], tuple(model_grid), False
        if rows == count:
            return None, pos_embed, tuple(model_grid), False
    raise ValueError(
        f'Cannot tell the patch grid of a learned pos_embed with {rows} rows: neither {rows - 1} nor {rows} is a '
        'square number. Load it into an encoder whose grid has that many patches.'
    )


def _model_pos_embed_layout(vit: nn.Module) -> tuple[int, tuple[int, int]]:
    """Return (CLS rows in the model's pos_embed, patch grid)."""
    grid = tuple(int(size) for size in vit.patch_embed.grid_size)
    num_prefix = int(getattr(vit, 'num_prefix_tokens', 1))
    cls_rows = 0 if getattr(vit, 'no_embed_class', False) else num_prefix
    if cls_rows > 1:
        raise ValueError(
            f'The encoder has {num_prefix} prefix tokens with position embeddings. Only ViTs with one CLS token '
            '(or none) can load these checkpoints.'
        )
    return cls_rows, grid


def _adapt_pos_embed(state: dict[str, torch.Tensor], vit: nn.Module) -> str:
    """Give ``state['pos_embed']`` the model's layout in place and return what was done, for the log."""
    pos_embed = state.get('pos_embed')
    if pos_embed is None:
        return 'pos_embed missing'
    model_cls_rows, model_grid = _model_pos_embed_layout(vit)
    model_pos_embed = vit.pos_embed
    expected_shape = tuple(model_pos_embed.shape)
    cls_row, patch_rows, grid, is_sincos = split_pos_embed(pos_embed, model_grid)
    if patch_rows.shape[-1] != expected_shape[-1]:
        return 'pos_embed width differs'  # reported by the shape check
    notes = []

    if is_sincos:
        # A fixed sin-cos table is regenerated for the model's grid. Resampling it would give an approximation of
        # the exact table, and for the frozen tables of this package's encoders the exact table is what training used.
        patch_rows = get_2d_sincos_pos_embed(patch_rows.shape[-1], model_grid).to(patch_rows.dtype).unsqueeze(0)
        if grid != model_grid:
            notes.append(
                f'fixed sin-cos table of the {_grid_text(grid)} grid rebuilt for the {_grid_text(model_grid)} grid'
            )
        else:
            notes.append('fixed sin-cos table')
    elif grid != model_grid:
        patch_rows = resample_abs_pos_embed(
            patch_rows, new_size=list(model_grid), old_size=list(grid), num_prefix_tokens=0, interpolation='bicubic'
        )
        notes.append(f'learned table resampled from the {_grid_text(grid)} grid to {_grid_text(model_grid)} (bicubic)')
    else:
        notes.append('learned table')

    if cls_row is None:
        cls_row = patch_rows.new_zeros(1, 1, patch_rows.shape[-1])
        if model_cls_rows:
            notes.append('zero CLS row added')
    fold = cls_row.device.type != 'meta' and bool(cls_row.abs().sum() > 0)
    # A non-zero CLS row only ever adds to the CLS token, so it moves into cls_token when the model's table is frozen
    # (its CLS row must stay zero) or has no CLS row. A trainable table with a CLS row keeps it.
    if fold and (model_cls_rows == 0 or not model_pos_embed.requires_grad) and 'cls_token' in state:
        state['cls_token'] = state['cls_token'] + cls_row.to(state['cls_token'].dtype)
        cls_row = torch.zeros_like(cls_row)
        notes.append('non-zero CLS row added into cls_token')
    state['pos_embed'] = torch.cat([cls_row, patch_rows], dim=1) if model_cls_rows else patch_rows
    return ', '.join(notes)


def _grid_text(grid: tuple[int, int]) -> str:
    return f'{grid[0]}x{grid[1]}'


def _patch_size(weight: torch.Tensor) -> tuple[int, int]:
    return tuple(int(size) for size in weight.shape[-2:])


def adapt_encoder_state_dict(
    state: Mapping[str, torch.Tensor], vit: nn.Module, *, source: str = 'checkpoint'
) -> tuple[dict[str, torch.Tensor], str]:
    """Adapt a ViT state dict (keys without prefix) to ``vit`` and check that it matches every tensor.

    The position embedding gets the model's layout ``[1, 1 + N, D]`` (or ``[1, N, D]`` for a model without a CLS row):

    * a table without a CLS row (MAE-CT) gets a zero row;
    * a fixed 2-D sin-cos table, recognised by its values, is replaced by the exact table of the model's grid, also
      when the grids differ (a resampled sin-cos table would only approximate it);
    * a learned table of another grid is resampled with timm's ``resample_abs_pos_embed`` (bicubic, antialiased);
    * a non-zero CLS row is added into ``cls_token`` and zeroed when the model's table is frozen or has no CLS row,
      which leaves the model's output unchanged.

    Args:
        state: ViT tensors, as :func:`extract_encoder_state_dict` returns them.
        vit: The target ViT. It may be on the meta device, since only its shapes and ``requires_grad`` flags are read.
        source: Name of the checkpoint in messages.

    Returns:
        ``(adapted state dict, description of the position-embedding step)``.

    Raises:
        ValueError: On another patch size, naming both, or when any tensor is missing, unexpected or of another
            shape; that message lists them.
    """
    state = dict(state)
    expected = vit.state_dict()
    key = 'patch_embed.proj.weight'
    if key in state and key in expected and state[key].dim() == 4:
        file_patch, model_patch = _patch_size(state[key]), _patch_size(expected[key])
        if file_patch != model_patch:
            raise ValueError(
                f'{source} has patch size {_grid_text(file_patch)}, but the encoder has patch size '
                f'{_grid_text(model_patch)}. Create the encoder with patch_size={file_patch[0]} '
                f'(model.encoder.patch_size in a YAML) or load a checkpoint with {_grid_text(model_patch)} patches.'
            )
    note = _adapt_pos_embed(state, vit) if 'pos_embed' in expected else 'no pos_embed in the model'
    _check_match(state, expected, source, hint='Check that model.encoder describes the architecture of the checkpoint.')
    return state, note


def _check_match(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str, *, hint: str
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f'{key}: {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model'
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or mismatched:
        matched = len(expected) - len(missing) - len(mismatched)
        raise ValueError(
            f'{source} does not match the model: {matched} of {len(expected)} tensors match by name and shape; '
            f'{len(missing)} missing keys {missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}, '
            f'{len(mismatched)} shape mismatches {mismatched[:10]}. {hint}'
        )


# ---------------------------------------------------------------------------------------------------------------------
# Encoder loading
# ---------------------------------------------------------------------------------------------------------------------


def load_encoder_weights(vit: VisionTransformer, path: str | Path, *, weights: Weights = 'raw') -> None:
    """Load a ViT's weights from a checkpoint, requiring every tensor to match by name and shape.

    See the module docstring for the formats, :func:`extract_encoder_state_dict` for how the ViT is found and
    :func:`adapt_encoder_state_dict` for how position embeddings are adapted to the model's grid.

    Args:
        vit: The encoder to load into, in place.
        path: A checkpoint file or a sharded Composer checkpoint folder.
        weights: ``'raw'`` for the training weights, ``'ema'`` for the weights of Composer's ``EMA`` algorithm.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file needs arbitrary unpickling, has no ViT or no EMA weights (for ``'ema'``), has another
            patch size, or does not match every tensor of ``vit``; the message lists missing, unexpected and
            mis-shaped keys.
    """
    checkpoint = load_checkpoint_file(path)
    source = f'Checkpoint {str(path)!r} ({describe_format(checkpoint)}, {weights} weights)'
    state = extract_encoder_state_dict(checkpoint, weights=weights)
    state, note = adapt_encoder_state_dict(state, vit, source=source)
    vit.load_state_dict(state, strict=True)
    log.info('Loaded %d encoder tensors (%s weights) from %s; pos_embed: %s', len(state), weights, path, note)


def check_encoder_weights(vit: nn.Module, path: str | Path, *, weights: Weights = 'raw') -> str:
    """Check that a checkpoint would load into ``vit`` without loading it, and return a one-line summary.

    Pickled files are memory-mapped, so only the position embedding is read. ``vit`` may be on the meta device.

    Raises:
        The errors of :func:`load_encoder_weights`.
    """
    path = Path(path)
    if path.is_dir() or path.name == '.metadata':
        folder = path.parent if path.name == '.metadata' else path
        checkpoint = _read_sharded_checkpoint(folder, tensor_filter=_reads_pos_embed)
    else:
        checkpoint = load_checkpoint_file(path, mmap=True)
    source = f'Checkpoint {str(path)!r} ({describe_format(checkpoint)}, {weights} weights)'
    state = extract_encoder_state_dict(checkpoint, weights=weights)
    state, note = adapt_encoder_state_dict(state, vit, source=source)
    return f'{len(state)} encoder tensors match ({describe_format(checkpoint)}, {weights} weights); pos_embed: {note}'


def _reads_pos_embed(object_path: tuple) -> bool:
    return str(object_path[-1]).endswith('pos_embed') or str(object_path[-1]).endswith('cls_token')


# ---------------------------------------------------------------------------------------------------------------------
# NNCLR head
# ---------------------------------------------------------------------------------------------------------------------


def extract_head_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Return the NNCLR head and its queue from a loaded checkpoint, in the layout of ``ContrastiveHead``.

    The result has the keys ``head.projector.*``, ``head.predictor.*``, ``head.target_projector.*`` (when saved) and
    ``queue.queue``, ``queue.queue_ids``, ``queue.queue_labels``, ``queue.queue_ptr`` and ``queue.num_filled`` (when
    saved) as far as the checkpoint has them. Two layouts are read, under any prefix:

    * this package's (``maect_head.head.projector.*``, ``maect_head.queue.queue``, ...);
    * official MAE-CT (``projector.*``, ``predictor.*``, ``target_projector.*``, ``queue``, ``queue_y`` for the labels,
      ``queue_id`` for the ids, ``queue_ptr``). The ``nn.Sequential`` indices of projector and predictor are the same
      in both.

    Composer checkpoints give the training weights, also when the ``EMA`` algorithm swapped its weights in.

    Raises:
        ValueError: If no head is found or it is found under several prefixes.
    """
    state = select_weights(checkpoint, 'raw')
    prefix = _find_prefix(state, ('projector.0.weight', 'predictor.0.weight'), ('maect_head.head.', ''), 'NNCLR head')
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefix) and key[len(prefix) :].startswith(_HEAD_PARTS):
            head['head.' + key[len(prefix) :]] = value

    package_queue = prefix.removesuffix('head.') + 'queue.' if prefix.endswith('head.') else None
    if package_queue is not None and package_queue + 'queue' in state:
        for key, value in state.items():
            if key.startswith(package_queue):
                head['queue.' + key[len(package_queue) :]] = value
    else:
        for official, ours in _OFFICIAL_QUEUE_KEYS.items():
            if prefix + official in state:
                head[ours] = state[prefix + official]
    if 'queue.queue_ptr' in head:
        head['queue.queue_ptr'] = head['queue.queue_ptr'].reshape(1).long()
    return head


def load_head_weights(head_module: nn.Module, path: str | Path) -> None:
    """Load an NNCLR head, with its queue when the module has one, from a checkpoint.

    Args:
        head_module: This package's ``ContrastiveHead`` (``model.maect_head``: the head under ``head``, the queue
            under ``queue``) or a bare ``NNCLRHead``.
        path: A checkpoint in one of the layouts of :func:`extract_head_state_dict`.

    A head with an EMA target projector that loads a checkpoint without one gets a copy of the projector, as the
    transition from head initialisation to tuning needs. A head without a target ignores saved target weights. A bare
    ``NNCLRHead`` ignores the queue. Without ``num_filled`` in the file (official files), the queue counts the entries
    that carry an id as filled.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If no head is found, or any remaining tensor is missing, unexpected or of another shape.
    """
    checkpoint = load_checkpoint_file(path)
    state = extract_head_state_dict(checkpoint)
    expected_keys = set(head_module.state_dict())
    if not any(key.startswith('queue.') for key in expected_keys):
        dropped = [key for key in state if key.startswith('queue.')]
        state = {key.removeprefix('head.'): value for key, value in state.items() if not key.startswith('queue.')}
        if dropped:
            log.info('The head module has no queue, so %d queue tensors of %s were not loaded.', len(dropped), path)
    head_prefix = 'head.' if any(key.startswith('head.') for key in expected_keys) else ''
    if not any(key.startswith(head_prefix + 'target_projector.') for key in expected_keys):
        targets = [key for key in state if key.startswith(head_prefix + 'target_projector.')]
        for key in targets:
            del state[key]
        if targets:
            log.info('The head has no target projector, so the saved target projector of %s was not loaded.', path)
    else:
        # The head's pre-hook fills a missing target from the projector, so the check below must not count it.
        state = _with_target_from_projector(state, head_prefix)
    if 'queue.num_filled' in expected_keys and 'queue.num_filled' not in state and 'queue.queue_ids' in state:
        state['queue.num_filled'] = (state['queue.queue_ids'] != -1).sum().reshape(1)

    _check_match(
        state,
        head_module.state_dict(),
        f'Head checkpoint {str(path)!r}',
        hint='Check proj_hidden_dim, pred_hidden_dim, out_dim and queue_size against the run that saved it.',
    )
    head_module.load_state_dict(state, strict=True)
    log.info('Loaded %d head and queue tensors from %s', len(state), path)


def _with_target_from_projector(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    target = prefix + 'target_projector.'
    if any(key.startswith(target) for key in state):
        return state
    projector = prefix + 'projector.'
    copies = {
        target + key[len(projector) :]: value.clone() for key, value in state.items() if key.startswith(projector)
    }
    return {**state, **copies}
