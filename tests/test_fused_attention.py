"""Every attention of the encoder, the MAE decoder and the contrastive step runs ``F.scaled_dot_product_attention``."""

from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from composer_maect.algorithms import ContrastiveTuning
from composer_maect.algorithms.contrastive_tuning import attach_contrastive_head
from composer_maect.models.encoder_model import ViTEncoderModel
from composer_maect.models.mae import MAEModel
from composer_maect.models.vit import create_encoder

ENCODER_DEPTH = 3
DECODER_DEPTH = 2


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def attention_ops(ops: Counter) -> tuple[int, int]:
    """Return (fused attention kernels, softmax calls) among the recorded ops."""
    fused = sum(count for name, count in ops.items() if 'scaled_dot_product' in name)
    softmax = sum(count for name, count in ops.items() if name in ('aten::_softmax', 'aten::softmax'))
    return fused, softmax


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=ENCODER_DEPTH)


def test_attention_modules_use_fused_path():
    model = MAEModel(encoder(), decoder_dim=32, decoder_depth=DECODER_DEPTH, decoder_num_heads=2)
    flags = {name: module.fused_attn for name, module in model.named_modules() if hasattr(module, 'fused_attn')}
    assert len(flags) == ENCODER_DEPTH + DECODER_DEPTH
    assert all(flags.values()), flags


def test_mae_forward_runs_fused_kernels():
    model = MAEModel(encoder(), decoder_dim=32, decoder_depth=DECODER_DEPTH, decoder_num_heads=2)
    with OpCounter() as counter:
        model({'image': torch.randn(2, 3, 32, 32)})
    assert attention_ops(counter.ops) == (ENCODER_DEPTH + DECODER_DEPTH, 0)


def test_contrastive_loss_runs_fused_kernels():
    model = ViTEncoderModel(encoder())
    algorithm = ContrastiveTuning(queue_size=8, proj_hidden_dim=16, pred_hidden_dim=16, out_dim=8)
    # What Event.INIT does, without a Trainer.
    algorithm._vit, algorithm._head = attach_contrastive_head(
        model, None, proj_hidden_dim=16, pred_hidden_dim=16, out_dim=8, queue_size=8
    )
    batch = {'view0': torch.randn(4, 3, 32, 32), 'view1': torch.randn(4, 3, 32, 32)}
    with OpCounter() as counter:
        algorithm.compute_loss(batch)
    # Both views go through the encoder in one call.
    assert attention_ops(counter.ops) == (ENCODER_DEPTH, 0)
