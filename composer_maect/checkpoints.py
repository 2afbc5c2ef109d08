"""Encoder weights from checkpoint files: this package's Composer checkpoints and official MAE ``{'model': ...}`` files.

Files are read with ``torch.load(weights_only=True)``. Composer checkpoints also hold time stamps, the torch version and
NumPy random states, so those few types are allowlisted; a file that needs any other type is rejected.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

__all__ = ['extract_encoder_state_dict', 'load_checkpoint_file', 'load_encoder_weights']

log = logging.getLogger(__name__)

# Prefixes under which a ViT's keys appear in the files this package reads, most specific first.
ENCODER_PREFIXES = ('encoder.vit.', 'encoder.', 'module.', '_orig_mod.', 'model.', 'backbone.', '')
_PROBE_KEYS = ('cls_token', 'patch_embed.proj.weight')


def _safe_globals() -> list:
    numpy_dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType')]
    return [
        datetime.timedelta,
        torch.torch_version.TorchVersion,
        np.core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        *numpy_dtypes,
    ]


def load_checkpoint_file(path: str | Path) -> dict:
    """Load a checkpoint file with ``weights_only=True`` and the allowlisted types above.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file needs arbitrary unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {str(path)!r} not found.')
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        if 'Weights only load failed' not in str(error):
            raise
        raise ValueError(
            f'Checkpoint {str(path)!r} contains objects other than tensors and plain containers, so loading it would '
            'run arbitrary code. Re-save only its state dict, for example '
            "torch.save({'model': model.state_dict()}, 'weights.pth'), in a trusted environment."
        ) from error


def extract_encoder_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Return the ViT keys of a loaded checkpoint, without their prefix.

    Understands Composer checkpoints (``{'state': {'model': ...}}``), ``{'model': ...}`` and ``{'state_dict': ...}``
    wrappers and bare state dicts, with the ViT under any prefix of ``ENCODER_PREFIXES``.

    Raises:
        ValueError: if no ViT keys are found.
    """
    state = checkpoint
    for wrapper in ('state', 'model', 'state_dict'):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    for prefix in ENCODER_PREFIXES:
        if all(prefix + key in state for key in _PROBE_KEYS):
            return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    sample = sorted(state)[:8]
    raise ValueError(
        f'No ViT weights found: expected keys such as {list(_PROBE_KEYS)} under one of the prefixes '
        f'{list(ENCODER_PREFIXES)}; the first keys are {sample}.'
    )


def load_encoder_weights(vit: VisionTransformer, path: str | Path) -> None:
    """Load a ViT's weights from a checkpoint file, requiring every tensor to match by name and shape.

    Keys that belong to other parts of the same model (a decoder, a head) are ignored when they are not under the
    ViT's prefix.

    Raises:
        ValueError: if any ViT tensor is missing, unexpected or of another shape; the message lists them.
    """
    weights = extract_encoder_state_dict(load_checkpoint_file(path))
    expected = vit.state_dict()
    # Keys of other parts of the model stored next to the ViT (e.g. 'decoder_*' under a bare prefix) are not ViT keys.
    weights = {key: value for key, value in weights.items() if not key.startswith(('decoder', 'mask_token', 'maect_'))}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(
        f'{key}: {tuple(weights[key].shape)} in the file, {tuple(expected[key].shape)} in the model'
        for key in set(expected) & set(weights)
        if weights[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f'Checkpoint {str(path)!r} does not match the encoder: {len(missing)} missing keys {missing[:10]}, '
            f'{len(unexpected)} unexpected keys {unexpected[:10]}, '
            f'{len(mismatched)} shape mismatches {mismatched[:10]}. '
            'Check that model.encoder describes the architecture the checkpoint was trained with.'
        )
    vit.load_state_dict(weights, strict=True)
    log.info('Loaded %d encoder tensors from %s', len(weights), path)
