"""CLIP vision tower vs Hugging Face transformers' CLIPVisionModel hidden states."""
import pytest
import torch
import transformers
from tolerances import TOL

from vittle_fast.models import clip_from_hf

NUM_LAYERS = 3


def tiny_vision_config(**overrides) -> transformers.CLIPVisionConfig:
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                  image_size=28, patch_size=14, projection_dim=16)
    return transformers.CLIPVisionConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = transformers.CLIPVisionModel(tiny_vision_config()).eval()
    path = tmp_path_factory.mktemp("clip_vision")
    hf.save_pretrained(path)
    return hf, clip_from_hf(path).eval()


@pytest.mark.parametrize("feature_layer", [-2, -1, 0, 1, -NUM_LAYERS - 1])
def test_selected_layer_matches_hf_hidden_states(hf_and_ours, feature_layer):
    hf, ours = hf_and_ours
    pixel_values = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected = hf(pixel_values, output_hidden_states=True).hidden_states[feature_layer]
        torch.testing.assert_close(ours(pixel_values, feature_layer, keep_cls=True), expected, **TOL["float32"])
        torch.testing.assert_close(ours(pixel_values, feature_layer), expected[:, 1:], **TOL["float32"])


def test_loads_the_vision_half_of_a_clip_model(tmp_path):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = transformers.CLIPConfig(text_config=text, vision_config=tiny_vision_config().to_dict())
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(tmp_path)
    ours = clip_from_hf(tmp_path).eval()  # text tower, projections and logit_scale are ignored by name
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = hf.vision_model(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(ours(pixel_values), expected, **TOL["float32"])


def test_bad_inputs_raise(hf_and_ours):
    _, ours = hf_and_ours
    with pytest.raises(ValueError, match="feature_layer"):
        ours(torch.randn(1, 3, 28, 28), NUM_LAYERS + 1)
    with pytest.raises(ValueError, match="28x28"):
        ours(torch.randn(1, 3, 42, 42))
