"""``model.encoder.compile_blocks``: torch.compile of every encoder block, with the state-dict keys unchanged."""

import pytest
import torch

from composer_maect.config import EncoderConfig, ModelConfig
from composer_maect.models.vit import compile_encoder_blocks, create_encoder
from composer_maect.train import build_model


def tiny_model_config(compile_blocks: bool) -> ModelConfig:
    encoder = EncoderConfig(
        name='vit_tiny_patch16', img_size=32, patch_size=8, timm_kwargs={'depth': 2}, compile_blocks=compile_blocks
    )
    return ModelConfig(encoder=encoder, name='vit_encoder')


def test_config_compiles_every_block():
    compiled = build_model(tiny_model_config(True), load_weights=False)
    plain = build_model(tiny_model_config(False), load_weights=False)
    assert all(block._compiled_call_impl is not None for block in compiled.encoder.blocks)
    assert all(block._compiled_call_impl is None for block in plain.encoder.blocks)
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    torch.manual_seed(0)
    eager = create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=2)
    compiled = create_encoder('vit_tiny_patch16', img_size=32, patch_size=8, depth=2)
    compiled.load_state_dict(eager.state_dict())
    compile_encoder_blocks(compiled)
    images = torch.randn(2, 3, 32, 32)

    expected = eager.forward_features(images)
    expected.mean().backward()
    actual = compiled.forward_features(images)
    actual.mean().backward()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.blocks[1].mlp.fc2.weight.grad, eager.blocks[1].mlp.fc2.weight.grad)
