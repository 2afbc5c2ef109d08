"""MAE models on timm ViTs: encoders, position embeddings, masking, decoder, loss and the ComposerModel."""

from composer_maect.models.mae import (
    MAEDecoder,
    MAEModel,
    MaskedEncoder,
    mae_forward_flops,
    mae_loss,
    normalize_patches,
    patchify,
    unpatchify,
)
from composer_maect.models.masking import num_kept_patches, random_masking
from composer_maect.models.pos_embed import build_fixed_pos_embed, get_1d_sincos_pos_embed, get_2d_sincos_pos_embed
from composer_maect.models.vit import ENCODER_ALIASES, create_encoder, init_weights_mae, resolve_encoder_name

__all__ = [
    'ENCODER_ALIASES',
    'MAEDecoder',
    'MAEModel',
    'MaskedEncoder',
    'build_fixed_pos_embed',
    'create_encoder',
    'get_1d_sincos_pos_embed',
    'get_2d_sincos_pos_embed',
    'init_weights_mae',
    'mae_forward_flops',
    'mae_loss',
    'normalize_patches',
    'num_kept_patches',
    'patchify',
    'random_masking',
    'resolve_encoder_name',
    'unpatchify',
]
