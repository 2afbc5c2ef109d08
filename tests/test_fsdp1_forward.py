"""ContrastiveTuning and the k-NN path under FSDP1, wrapped on 2 gloo CPU ranks as Composer 0.32.1 wraps a model.

Composer builds FSDP1 only on CUDA devices, so these tests wrap the model with torch's ``FullyShardedDataParallel``
directly, the way Composer does: every child of the ``ComposerModel`` becomes a unit, the transformer blocks nested
units, with ``use_orig_params=True``.
"""

import types

import torch

from composer_maect.algorithms.contrastive_tuning import ContrastiveTuning, attach_contrastive_head
from composer_maect.fsdp1_forward import find_fsdp1_wrapper, fsdp1_forward_features
from composer_maect.models.encoder_model import ViTEncoderModel
from composer_maect.models.vit import create_encoder
from tests.gloo import spawn_ranks

HEAD_KWARGS = {'proj_hidden_dim': 64, 'pred_hidden_dim': 64, 'out_dim': 16, 'queue_size': 32}


def _wrap_like_composer(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    block_type = type(model.encoder.blocks[0])
    for name, child in list(model.named_children()):
        wrapped = FullyShardedDataParallel(
            child,
            auto_wrap_policy=ModuleWrapPolicy({block_type}),
            use_orig_params=True,
            device_id=torch.device('cpu'),
        )
        setattr(model, name, wrapped)


def _fsdp1_worker(rank: int) -> dict:
    torch.manual_seed(0)
    model = ViTEncoderModel(create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=2))
    vit, head = attach_contrastive_head(model, None, **HEAD_KWARGS)
    for param in vit.blocks[0].parameters():
        param.requires_grad_(False)
    reference = create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=2)
    reference.load_state_dict(vit.state_dict())
    _wrap_like_composer(model)

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    result: dict = {'vit_wrapped': find_fsdp1_wrapper(model, vit) is not None}
    try:
        vit.forward_features(images)
        result['direct_call'] = 'ran'
    except RuntimeError as error:
        result['direct_call'] = str(error)

    with fsdp1_forward_features(model, vit), torch.no_grad():
        tokens = vit.forward_features(images)
    result['tokens_error'] = (tokens - reference.forward_features(images)).abs().max().item()
    result['route_removed'] = 'forward_features' not in vit.__dict__

    algorithm = ContrastiveTuning(hflip=False, **HEAD_KWARGS)
    algorithm._vit, algorithm._head = vit, head
    algorithm._route_fsdp1_calls(types.SimpleNamespace(model=model))
    result['head_wrapped'] = algorithm._head_forward is not None
    loss = algorithm.compute_loss({'view0': images, 'view1': images.flip(-1), 'index': torch.arange(4) + 4 * rank})
    loss.backward()
    result['loss'] = loss.item()
    result['has_block_grad'] = any(p.grad is not None for p in vit.blocks[1].parameters())
    result['has_head_grad'] = any(p.grad is not None for p in head.parameters())
    return result


def test_fsdp1_calls_through_wrapper(tmp_path):
    ranks = spawn_ranks(_fsdp1_worker, tmp_path)
    for rank, result in enumerate(ranks):
        assert result['vit_wrapped'], rank
        assert result['head_wrapped'], rank
        # Without the route, the unwrapped ViT meets its sharded patch embedding.
        assert result['direct_call'] != 'ran', rank
        assert result['tokens_error'] < 1e-5, rank
        assert result['route_removed'], rank
        assert torch.isfinite(torch.tensor(result['loss'])), rank
        assert result['has_block_grad'], rank
        assert result['has_head_grad'], rank
