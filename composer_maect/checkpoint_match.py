"""Check a Composer checkpoint against the model before the Trainer loads it.

Composer's Trainer loads ``load_path`` (or the checkpoint that ``autoresume`` finds) into the model with
``load_state_dict``. For a checkpoint of another architecture, torch then raises one line per mis-shaped tensor,
often hundreds for a ViT, without saying which setting differs. ``check_trainer_checkpoint`` compares names and shapes
first, reading only the checkpoint's tensor metadata (pickled files are memory-mapped, sharded folders are read from
their ``.metadata``), and raises one short error.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from composer_maect.checkpoints import _clean, _composer_state, _read_sharded_checkpoint, load_checkpoint_file

__all__ = ['check_trainer_checkpoint']

_MAX_LISTED = 8


def _read_model_state(path: Path) -> dict[str, torch.Tensor]:
    folder = path.parent if path.name == '.metadata' else path
    if folder.is_dir():
        # Tensors come back as meta tensors of the saved shape, so no weights are read.
        checkpoint = _read_sharded_checkpoint(folder, tensor_filter=lambda object_path: False)
    else:
        checkpoint = load_checkpoint_file(path, mmap=True)
    state = _composer_state(checkpoint)
    if state is None:
        raise ValueError(
            f"Checkpoint {str(path)!r} is not a checkpoint of Composer's Trainer (it has no state.model), so it "
            'cannot be resumed from. To start the encoder from other weights (an MAE, MAE-CT or timm file), set '
            'model.init_from.path instead.'
        )
    return {key: value for key, value in _clean(state['model']).items() if isinstance(value, torch.Tensor)}


def _summarize(items: list[str], what: str, separator: str) -> str:
    if not items:
        return ''
    more = f' and {len(items) - _MAX_LISTED} more' if len(items) > _MAX_LISTED else ''
    return f'{len(items)} {what}: {separator.join(items[:_MAX_LISTED])}{more}.'


def check_trainer_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    ignore_keys: Sequence[str] | None = None,
    strict: bool = True,
) -> int:
    """Check that a Composer checkpoint's model weights fit ``model`` by name and shape, without loading them.

    Saved keys under a top-level module that ``model`` lacks are not checked: algorithms such as
    ``contrastive_tuning`` add their modules to the model when the Trainer starts, before it loads the checkpoint.

    Args:
        model: the ``ComposerModel`` that the Trainer will load into.
        path: a local checkpoint file, sharded checkpoint folder, or a link to either (Composer's ``latest`` link).
        ignore_keys: Composer's ``load_ignore_keys`` globs (such as ``'state/model/decoder*'``); matching keys are
            not checked.
        strict: as Composer's ``load_strict_model_weights``. False allows missing and unexpected keys, but not
            tensors of another shape.

    Returns:
        The number of tensors that match by name and shape.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a Trainer checkpoint, a tensor has another shape, or (with ``strict``) a tensor
            is missing or unexpected. The message lists up to 8 of each, with both shapes.
    """
    path = Path(path)
    saved = _read_model_state(path)
    expected = _clean(model.state_dict())
    ignored = set()
    for pattern in ignore_keys or ():
        ignored.update(key for key in {**saved, **expected} if fnmatch.fnmatch(f'state/model/{key}', pattern))

    mismatched = [
        f'{key}: {tuple(saved[key].shape)} in the checkpoint, {tuple(expected[key].shape)} in the model'
        for key in expected
        if key in saved and key not in ignored and tuple(saved[key].shape) != tuple(expected[key].shape)
    ]
    missing, unexpected = [], []
    if strict:
        missing = [key for key in expected if key not in saved and key not in ignored]
        # Saved keys under a module that the model does not have yet may belong to a module that an algorithm adds
        # when the Trainer starts, so only saved keys under the model's own modules count as unexpected.
        modules = {key.split('.')[0] for key in expected}
        unexpected = [
            key for key in saved if key not in expected and key not in ignored and key.split('.')[0] in modules
        ]
    if not mismatched and not missing and not unexpected:
        return sum(1 for key in expected if key in saved and key not in ignored)

    problems = [
        _summarize(mismatched, 'tensors differ in shape', '; '),
        _summarize(missing, 'tensors of the model are not in the checkpoint', ', '),
        _summarize(unexpected, 'tensors of the checkpoint are not in the model', ', '),
    ]
    raise ValueError(
        f'Checkpoint {str(path)!r} was saved from another model architecture than the one configured. '
        + ' '.join(problem for problem in problems if problem)
        + ' Set model.encoder (name, img_size, patch_size, timm_kwargs such as depth and embed_dim) and model.decoder '
        'to the values of the run that saved it, or start from other weights.'
    )
