"""Export a tuned encoder for timm: ``python -m composer_maect.export CHECKPOINT OUT_DIR``.

Files written to ``OUT_DIR``:

* ``model.safetensors``: the encoder in the layout of timm's ``VisionTransformer`` (``pos_embed`` ``[1, 1 + N, D]``
  with a zero CLS row, no classifier). By default these are the EMA weights when the checkpoint has them, which is
  the model that MAE-CT evaluates and releases, and otherwise the raw weights with a warning.
* ``load_with_timm.py``: the ``timm.create_model(...)`` call that loads it; running the script prints the feature
  shape. The call is also printed.
* with ``--official-mae``: ``mae_encoder.pth``, the same tensors as ``{'model': state_dict}``, the layout of the
  official MAE files.
* with ``--with-head``: ``head.safetensors``, the NNCLR head (training weights) and its queue in the layout of
  ``ContrastiveHead``, which :func:`composer_maect.checkpoints.load_head_weights` reads.

The checkpoint can be anything that :func:`composer_maect.checkpoints.load_encoder_weights` reads. Composer checkpoints
do not store the model configuration, so the architecture is inferred from the tensor shapes: width, depth, MLP ratio,
patch size, input channels, and the patch grid from ``pos_embed``. The number of attention heads cannot be inferred
from the weights. It comes from ``--num-heads``, or else from the width of the standard ViTs (192: 3, 384: 6,
768: 12, 1024: 16, 1280: 16).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from composer_maect.checkpoints import (
    Weights,
    adapt_encoder_state_dict,
    describe_format,
    extract_encoder_state_dict,
    extract_head_state_dict,
    has_ema_weights,
    load_checkpoint_file,
    split_pos_embed,
)

__all__ = [
    'DEFAULT_NUM_HEADS',
    'ExportResult',
    'ViTArchitecture',
    'export_checkpoint',
    'format_create_model_call',
    'infer_architecture',
    'main',
    'timm_create_model_args',
]

log = logging.getLogger('composer_maect.export')  # __name__ is '__main__' under python -m

MODEL_FILE = 'model.safetensors'
SCRIPT_FILE = 'load_with_timm.py'
OFFICIAL_MAE_FILE = 'mae_encoder.pth'
HEAD_FILE = 'head.safetensors'

# Attention heads of the standard ViT widths (timm's vit_tiny/small/base/large/huge), used without --num-heads.
DEFAULT_NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

# Width -> (timm model name, depth, num_heads, patch size). The '.mae' tags carry the official MAE weights' data
# config (ImageNet mean and std, num_classes=0), which is what an exported MAE-CT encoder needs too.
_NAMED_VITS = {
    192: ('vit_tiny_patch16_224', 12, 3, 16),
    384: ('vit_small_patch16_224', 12, 6, 16),
    768: ('vit_base_patch16_224.mae', 12, 12, 16),
    1024: ('vit_large_patch16_224.mae', 24, 16, 16),
    1280: ('vit_huge_patch14_224.mae', 32, 16, 14),
}
# Pooling of this package (``ContrastiveTuning`` and the k-NN monitor) -> timm's global_pool.
_GLOBAL_POOL = {'cls': 'token', 'mean_patch': 'avg'}
_BLOCK_KEY = re.compile(r'^blocks\.(\d+)\.')


@dataclass(frozen=True)
class ViTArchitecture:
    """Shape of a ViT encoder as inferred from its weights."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    in_chans: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True

    @property
    def img_size(self) -> tuple[int, int]:
        """Input resolution ``(height, width)`` in pixels."""
        return (self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1])


@dataclass
class ExportResult:
    """Files written by :func:`export_checkpoint` and the timm call that loads ``model.safetensors``."""

    out_dir: Path
    weights: str
    architecture: ViTArchitecture
    model_name: str
    create_kwargs: dict[str, Any]
    call: str
    files: list[Path] = field(default_factory=list)


def infer_architecture(state: Mapping[str, torch.Tensor], *, num_heads: int | None = None) -> ViTArchitecture:
    """Infer a ViT's architecture from its state dict (keys without prefix).

    Raises:
        ValueError: If a required tensor is missing, the blocks are not numbered ``0 .. depth - 1``, or the number of
            heads is neither given nor a default for the width, or does not divide the width.
    """
    for key in ('patch_embed.proj.weight', 'pos_embed', 'blocks.0.mlp.fc1.weight'):
        if key not in state:
            raise ValueError(f'Cannot infer the ViT architecture: the weights have no {key!r}.')
    proj = state['patch_embed.proj.weight']  # [D, C, patch_h, patch_w]
    embed_dim, in_chans = int(proj.shape[0]), int(proj.shape[1])
    patch_size = (int(proj.shape[2]), int(proj.shape[3]))

    indices = sorted({int(match.group(1)) for key in state if (match := _BLOCK_KEY.match(key))})
    if indices != list(range(len(indices))):
        raise ValueError(f'The ViT blocks are not numbered 0 .. depth - 1: found block indices {indices}.')
    mlp_hidden = int(state['blocks.0.mlp.fc1.weight'].shape[0])
    _, _, grid_size, _ = split_pos_embed(state['pos_embed'])

    if num_heads is None:
        if embed_dim not in DEFAULT_NUM_HEADS:
            raise ValueError(
                f'The number of attention heads cannot be read from the weights, and the width {embed_dim} is not a '
                f'standard ViT width {sorted(DEFAULT_NUM_HEADS)}. Pass --num-heads (num_heads=...).'
            )
        num_heads = DEFAULT_NUM_HEADS[embed_dim]
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(f'num_heads must be a positive divisor of the width {embed_dim}, got {num_heads}.')
    return ViTArchitecture(
        embed_dim=embed_dim,
        depth=len(indices),
        num_heads=num_heads,
        patch_size=patch_size,
        grid_size=tuple(int(size) for size in grid_size),
        in_chans=in_chans,
        mlp_ratio=mlp_hidden / embed_dim,
        qkv_bias='blocks.0.attn.qkv.bias' in state,
    )


def _size_argument(size: tuple[int, int]) -> int | tuple[int, int]:
    return size[0] if size[0] == size[1] else size


def timm_create_model_args(
    architecture: ViTArchitecture, *, pooling: str = 'cls', weights_file: str | Path | None = None
) -> tuple[str, dict[str, Any]]:
    """Return the timm model name and keyword arguments that build ``architecture`` without a classifier.

    Arguments that the named model already fixes are left out. With ``weights_file`` the arguments load it through
    ``pretrained=True`` and ``pretrained_cfg_overlay=dict(file=...)``, which reads a local file only.

    Raises:
        ValueError: If ``pooling`` is not ``'cls'`` or ``'mean_patch'``.
    """
    if pooling not in _GLOBAL_POOL:
        raise ValueError(f'Invalid pooling {pooling!r}: expected one of {sorted(_GLOBAL_POOL)}.')
    named = _NAMED_VITS.get(architecture.embed_dim, ('vit_base_patch16_224', 12, 12, 16))
    name, depth, num_heads, patch = named
    kwargs: dict[str, Any] = {}
    if weights_file is not None:
        overlay: dict[str, Any] = {'file': str(weights_file)}
        if not name.endswith('.mae'):
            overlay.update(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        input_size = (architecture.in_chans, *architecture.img_size)
        if input_size != (3, 224, 224):
            overlay['input_size'] = input_size
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    kwargs['num_classes'] = 0
    kwargs['global_pool'] = _GLOBAL_POOL[pooling]
    if pooling == 'mean_patch':
        # timm's default for 'avg' is a LayerNorm after pooling in place of the final norm; MAE-CT pools after it.
        kwargs['fc_norm'] = False
    kwargs['img_size'] = _size_argument(architecture.img_size)
    if architecture.patch_size != (patch, patch):
        kwargs['patch_size'] = _size_argument(architecture.patch_size)
    if architecture.embed_dim not in _NAMED_VITS:
        kwargs['embed_dim'] = architecture.embed_dim
    if architecture.depth != depth:
        kwargs['depth'] = architecture.depth
    if architecture.num_heads != num_heads:
        kwargs['num_heads'] = architecture.num_heads
    if architecture.mlp_ratio != 4.0:
        kwargs['mlp_ratio'] = architecture.mlp_ratio
    if not architecture.qkv_bias:
        kwargs['qkv_bias'] = False
    if architecture.in_chans != 3:
        kwargs['in_chans'] = architecture.in_chans
    return name, kwargs


def format_create_model_call(name: str, kwargs: Mapping[str, Any], *, file_expression: str | None = None) -> str:
    """Format ``timm.create_model(name, **kwargs)`` as Python source, one argument per line.

    ``file_expression`` replaces the overlay's file path by a Python expression, such as a variable name.
    """
    lines = ['timm.create_model(', f'    {name!r},']
    for key, value in kwargs.items():
        if key == 'pretrained_cfg_overlay':
            items = []
            for overlay_key, overlay_value in value.items():
                text = file_expression if overlay_key == 'file' and file_expression else repr(overlay_value)
                items.append(f'{overlay_key}={text}')
            lines.append(f'    {key}=dict({", ".join(items)}),')
        else:
            lines.append(f'    {key}={value!r},')
    lines.append(')')
    return '\n'.join(lines)


def _contrastive_settings(checkpoint: Mapping) -> dict[str, Any]:
    state = checkpoint.get('state')
    if not isinstance(state, Mapping):
        return {}
    for entry in state.get('algorithms') or ():
        if isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] == 'ContrastiveTuning':
            settings = entry[1].get('settings') if isinstance(entry[1], Mapping) else None
            return dict(settings) if isinstance(settings, Mapping) else {}
    return {}


def _script_text(call: str, checkpoint: Path, weights: str, architecture: ViTArchitecture, pooling: str) -> str:
    channels, (height, width) = architecture.in_chans, architecture.img_size
    tokens = architecture.grid_size[0] * architecture.grid_size[1] + 1
    return f'''"""Load the encoder exported from {checkpoint.name} ({weights} weights) with timm.

Written by python -m composer_maect.export.
Inputs: [batch, {channels}, {height}, {width}], normalised with the mean and std of
timm.data.resolve_data_config(model=model).
model(images): the pooled features [batch, {architecture.embed_dim}] ({pooling} pooling after the final norm).
model.forward_features(images): every token [batch, {tokens}, {architecture.embed_dim}] after the final norm.
"""

from pathlib import Path

import timm
import torch

WEIGHTS = Path(__file__).resolve().with_name({MODEL_FILE!r})


def create_model() -> torch.nn.Module:
    return {call.replace(chr(10), chr(10) + '    ')}


if __name__ == '__main__':
    model = create_model().eval()
    with torch.no_grad():
        features = model(torch.zeros(1, {channels}, {height}, {width}))
    print('features', tuple(features.shape))
'''


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous tensors that do not share memory.
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def export_checkpoint(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    weights: Weights | None = None,
    official_mae: bool = False,
    with_head: bool = False,
    num_heads: int | None = None,
    pooling: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> ExportResult:
    """Export the encoder of a checkpoint (and optionally its head) for timm. See the module docstring for the files.

    Args:
        checkpoint_path: A checkpoint file or sharded Composer checkpoint folder.
        out_dir: Output folder, created when missing.
        weights: ``'ema'`` or ``'raw'``. Default: ``'ema'`` when the checkpoint has EMA weights, else ``'raw'``.
        official_mae: Also write ``mae_encoder.pth`` as ``{'model': state_dict}``.
        with_head: Also write ``head.safetensors`` with the NNCLR head and its queue.
        num_heads: Attention heads. Default: by width (see :data:`DEFAULT_NUM_HEADS`).
        pooling: ``'cls'`` or ``'mean_patch'``, which sets timm's ``global_pool``. Default: the pooling that
            ``ContrastiveTuning`` recorded in the checkpoint, else ``'cls'``.
        overwrite: Replace existing output files.
        verify: Build the model with the written timm call and check that it contains exactly the exported tensors.

    Raises:
        FileExistsError: If an output file exists and ``overwrite`` is false.
        ValueError: If the checkpoint has no ViT, no EMA weights for ``weights='ema'``, no head for ``with_head``, or
            an architecture that cannot be inferred.
    """
    import timm
    from safetensors.torch import save_file

    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    checkpoint = load_checkpoint_file(checkpoint_path)
    if weights is None:
        if has_ema_weights(checkpoint):
            weights = 'ema'
        else:
            weights = 'raw'
            log.warning(
                '%s (%s) has no EMA weights, so its raw weights are exported.',
                checkpoint_path,
                describe_format(checkpoint),
            )
    state = extract_encoder_state_dict(checkpoint, weights=weights)
    architecture = infer_architecture(state, num_heads=num_heads)
    settings = _contrastive_settings(checkpoint)
    pooling = pooling or settings.get('pooling') or 'cls'

    planned = [out_dir / MODEL_FILE, out_dir / SCRIPT_FILE]
    planned += [out_dir / OFFICIAL_MAE_FILE] if official_mae else []
    planned += [out_dir / HEAD_FILE] if with_head else []
    existing = [str(path) for path in planned if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f'Output files exist: {existing}. Pass --overwrite to replace them.')
    head_state = extract_head_state_dict(checkpoint) if with_head else None

    model_file = (out_dir / MODEL_FILE).resolve()
    name, kwargs = timm_create_model_args(architecture, pooling=pooling, weights_file=model_file)
    # Adapt the weights to the timm model that the call builds: a CLS row for MAE-CT tables, the strict key check.
    with torch.device('meta'):
        target = timm.create_model(name, **{key: value for key, value in kwargs.items() if 'pretrained' not in key})
    state, note = adapt_encoder_state_dict(state, target, source=f'Checkpoint {str(checkpoint_path)!r}')
    state = _contiguous(state)

    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {
        'format': 'pt',
        'source': str(checkpoint_path),
        'weights': weights,
        'timm_model': name,
        'timm_kwargs': json.dumps({key: value for key, value in kwargs.items() if 'pretrained' not in key}),
    }
    save_file(state, model_file, metadata=metadata)
    files = [model_file]
    call = format_create_model_call(name, kwargs)
    script = out_dir / SCRIPT_FILE
    script.write_text(
        _script_text(
            format_create_model_call(name, kwargs, file_expression='str(WEIGHTS)'),
            checkpoint_path,
            weights,
            architecture,
            pooling,
        )
    )
    files.append(script)

    if official_mae:
        torch.save({'model': state}, out_dir / OFFICIAL_MAE_FILE)
        files.append(out_dir / OFFICIAL_MAE_FILE)
    if head_state is not None:
        head_metadata = {'format': 'pt', 'source': str(checkpoint_path), 'layout': 'composer_maect.ContrastiveHead'}
        if settings:
            head_metadata['contrastive_tuning'] = json.dumps(settings, default=str)
        save_file(_contiguous(head_state), out_dir / HEAD_FILE, metadata=head_metadata)
        files.append(out_dir / HEAD_FILE)

    if verify:
        _verify(name, kwargs, state)
    log.info('Exported %d encoder tensors (%s weights; pos_embed: %s) to %s', len(state), weights, note, out_dir)
    return ExportResult(out_dir, weights, architecture, name, kwargs, call, files)


def _verify(name: str, kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    import timm

    model = timm.create_model(name, **kwargs)
    loaded = model.state_dict()
    differing = sorted(key for key in state if key not in loaded or not torch.equal(loaded[key], state[key]))
    extra = sorted(set(loaded) - set(state))
    if differing or extra:
        raise RuntimeError(
            f'The timm call does not reproduce the exported weights: {len(differing)} differing tensors '
            f'{differing[:5]}, {len(extra)} tensors not exported {extra[:5]}.'
        )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m composer_maect.export',
        description='Export the encoder of a checkpoint as safetensors in timm layout, with the timm call that '
        'loads it.',
    )
    parser.add_argument('checkpoint', type=Path, help='checkpoint file, or sharded Composer checkpoint folder')
    parser.add_argument('out_dir', type=Path, help='output folder (created when missing)')
    parser.add_argument(
        '--weights',
        choices=['ema', 'raw'],
        default=None,
        help='encoder weights to export (default: ema when the checkpoint has them, else raw)',
    )
    parser.add_argument(
        '--official-mae', action='store_true', help=f"also write {OFFICIAL_MAE_FILE} as {{'model': state_dict}}"
    )
    parser.add_argument('--with-head', action='store_true', help=f'also write the NNCLR head and queue to {HEAD_FILE}')
    parser.add_argument(
        '--num-heads', type=int, default=None, help='attention heads (default: 3/6/12/16/16 for widths 192 to 1280)'
    )
    parser.add_argument(
        '--pooling',
        choices=sorted(_GLOBAL_POOL),
        default=None,
        help="pooling of the timm model's output (default: the tuning run's, else cls)",
    )
    parser.add_argument('--overwrite', action='store_true', help='replace existing output files')
    parser.add_argument(
        '--no-verify', action='store_true', help='skip building the timm model to check the exported weights'
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 on success, 1 on an invalid checkpoint or output folder)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        result = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            weights=args.weights,
            official_mae=args.official_mae,
            with_head=args.with_head,
            num_heads=args.num_heads,
            pooling=args.pooling,
            overwrite=args.overwrite,
            verify=not args.no_verify,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    print(f'Exported the {result.weights} weights of {args.checkpoint} to:')
    for path in result.files:
        print(f'  {path}')
    print('Load the encoder with:\n')
    print('import timm')
    print(result.call)
    return 0


if __name__ == '__main__':
    sys.exit(main())
