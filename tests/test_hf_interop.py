"""Loading and saving Hugging Face directories: round trips both ways, the released Vittle layout,
sharded checkpoints, and errors that name the offending weight."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tolerances import TOL

from vittle_fast.models import LlavaVittle, clip_from_hf, llama_from_hf, llava_from_hf, save_pretrained
from vittle_fast.models.llama import Llama
from vittle_fast.nn import VittleConfig

VOCAB, IMAGE_TOKEN = 64, 63


def text_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaConfig(**{**fields, **overrides})


def vision_config():
    return transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14)


def llava_inputs(image_token=IMAGE_TOKEN):
    input_ids = torch.randint(0, IMAGE_TOKEN, (1, 9))
    input_ids[0, 2:6] = image_token
    return input_ids, torch.randn(1, 3, 28, 28)


def test_saved_llama_loads_in_transformers(tmp_path):
    ours = Llama(text_config(tie_word_embeddings=True)).eval()
    save_pretrained(ours, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids).logits, ours(input_ids), **TOL["float32"])


def test_saved_llava_loads_in_transformers(tmp_path):
    ours = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN).eval()
    save_pretrained(ours, tmp_path)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    input_ids, pixel_values = llava_inputs()
    with torch.no_grad():
        expected = hf(input_ids=input_ids, pixel_values=pixel_values).logits
        torch.testing.assert_close(ours(input_ids, pixel_values=pixel_values).logits, expected, **TOL["float32"])


def test_sharded_round_trip_keeps_the_bottleneck(tmp_path):
    vittle = VittleConfig(layer_v=0, layer_t=1, prior="learnable", kl_text_tokens="all", backend="reference")
    ours = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, vittle).eval()
    with torch.no_grad():
        ours.bottleneck.prior_mu_v.normal_()
    save_pretrained(ours, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = llava_from_hf(tmp_path).eval()
    assert loaded.bottleneck.config == vittle
    input_ids, pixel_values = llava_inputs()
    with torch.no_grad():
        expected = ours(input_ids, pixel_values=pixel_values, vittle_alpha=0.5).logits
        torch.testing.assert_close(loaded(input_ids, pixel_values=pixel_values, vittle_alpha=0.5).logits, expected,
                                   rtol=0, atol=0)


def test_vittle_inserted_into_a_llava_hf_checkpoint_is_freshly_initialised(tmp_path):
    config = transformers.LlavaConfig(text_config=text_config(), vision_config=vision_config(),
                                      image_token_index=IMAGE_TOKEN)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    model = llava_from_hf(tmp_path, vittle=VittleConfig(layer_v=1, layer_t=1, prior="learnable"))
    assert not model.bottleneck.prior_mu_t.any() and not model.bottleneck.prior_logvar_v.any()
    weight = model.bottleneck.mlp_v[0].weight
    bound = weight.shape[1] ** -0.5  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert weight.abs().max() <= bound and weight.std() > bound / 4


def released_checkpoint(tmp_path, model: LlavaVittle, learnable_prior_flag: str):
    """Write ``model`` in the released LLaVA/Vittle repo layout, vision tower in a separate CLIP dir."""
    released, clip_dir = tmp_path / "vittle", tmp_path / "clip"
    save_pretrained(model.vision_tower, clip_dir)
    names = {"language_model.lm_head.": "lm_head.", "language_model.": "model.",
             "projector.linear_1.": "model.mm_projector.0.", "projector.linear_2.": "model.mm_projector.2.",
             "bottleneck.mlp_v.": "model.bottleneck_layer_v.", "bottleneck.mlp_t.": "model.bottleneck_layer_t.",
             "bottleneck.prior_mu_v": "model.learnable_prior.mean_v",
             "bottleneck.prior_logvar_v": "model.learnable_prior.logsigma_sq_v",
             "bottleneck.prior_mu_t": "model.learnable_prior.mean_t",
             "bottleneck.prior_logvar_t": "model.learnable_prior.logsigma_sq_t"}
    tensors = {}
    for name, param in model.named_parameters():
        if name.startswith("vision_tower."):
            continue
        prefix = next(p for p in names if name.startswith(p))
        tensor = param.detach().clone()
        tensors[names[prefix] + name[len(prefix):]] = tensor.view(1, 1, -1) if "prior" in name else tensor
    if model.bottleneck.config.prior == "fixed":  # the released trainer stores zero priors anyway
        for key in ("mean_v", "logsigma_sq_v", "mean_t", "logsigma_sq_t"):
            tensors[f"model.learnable_prior.{key}"] = torch.zeros(1, 1, 32)
    released.mkdir()
    save_file(tensors, released / "model.safetensors")
    config = {**model.language_model.config.to_dict(), "model_type": "vittle_llama",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "bottleneck_layeridx_v": "layer-1", "bottleneck_layeridx_t": "layer-0",
              "ib_strength_v": 0.1, "ib_strength_t": 0.2, "learnable_prior_flag": learnable_prior_flag}
    (released / "config.json").write_text(json.dumps(config))
    return released, clip_dir


@pytest.mark.parametrize("flag,prior", [("L", "learnable"), ("F", "fixed")])
def test_released_vittle_layout(tmp_path, flag, prior):
    vittle = VittleConfig(layer_v=1, layer_t=0, beta_t=0.2, prior=prior, kl_form="released", backend="reference")
    original = LlavaVittle(text_config(), vision_config(), -200, vittle).eval()
    if prior == "learnable":
        with torch.no_grad():
            original.bottleneck.prior_mu_t.normal_()
    released, clip_dir = released_checkpoint(tmp_path, original, flag)
    with pytest.raises(ValueError, match="vision_path"):
        llava_from_hf(released)
    loaded = llava_from_hf(released, vision_path=clip_dir).eval()
    assert loaded.image_token_id == -200
    assert loaded.bottleneck.config == VittleConfig(layer_v=1, layer_t=0, beta_v=0.1, beta_t=0.2, prior=prior,
                                                    kl_form="released")
    loaded.bottleneck.config.backend = "reference"
    input_ids, pixel_values = llava_inputs(image_token=-200)
    with torch.no_grad():
        expected = original(input_ids, pixel_values=pixel_values, vittle_alpha=0.5).logits
        torch.testing.assert_close(loaded(input_ids, pixel_values=pixel_values, vittle_alpha=0.5).logits, expected,
                                   rtol=0, atol=0)


def test_missing_weight_is_named(tmp_path):
    transformers.LlamaForCausalLM(text_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 weight\(s\).*layers\.1\.mlp\.up_proj\.weight"):
        llama_from_hf(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    transformers.LlamaForCausalLM(text_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(32, 64\) "
                                         r"but the model's 'layers.0.mlp.down_proj.weight' is \(32, 48\)"):
        llama_from_hf(tmp_path)


def test_unknown_keys_raise_or_warn(tmp_path):
    transformers.CLIPVisionModel(vision_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["encoder.layers.0.adapter.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="encoder.layers.0.adapter.weight"):
        clip_from_hf(tmp_path)
    with pytest.warns(UserWarning, match="encoder.layers.0.adapter.weight"):
        clip_from_hf(tmp_path, strict=False)


def test_directory_without_safetensors_is_refused(tmp_path):
    transformers.LlamaForCausalLM(text_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pickled .bin"):
        llama_from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama_from_hf(tmp_path / "absent")


def test_assemble_from_llama_and_clip_directories(tmp_path):
    """LLaVA stage-1 start: Vicuna + CLIP directories, fresh projector and bottleneck."""
    transformers.LlamaForCausalLM(text_config()).save_pretrained(tmp_path / "llm")
    transformers.CLIPVisionModel(vision_config()).save_pretrained(tmp_path / "clip")
    llama, clip = llama_from_hf(tmp_path / "llm"), clip_from_hf(tmp_path / "clip")
    vittle = VittleConfig(layer_v=1, layer_t=1, prior="learnable")
    model = LlavaVittle.from_parts(llama, clip, IMAGE_TOKEN, vittle=vittle).eval()
    assert model.language_model is llama and model.vision_tower is clip
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    bound = model.projector.linear_1.weight.shape[1] ** -0.5  # nn.Linear's default init
    assert model.projector.linear_1.weight.abs().max() <= bound and model.projector.linear_1.weight.std() > 0
    assert not model.bottleneck.prior_mu_v.any()
    text_ids = torch.randint(0, IMAGE_TOKEN, (1, 8))
    input_ids, pixel_values = llava_inputs()
    with torch.no_grad():  # alpha = 0: the bottleneck is the identity, so text-only logits are the Llama's
        torch.testing.assert_close(model(text_ids, vittle_alpha=0.0).logits, llama(text_ids), **TOL["float32"])
        assert model(input_ids, pixel_values=pixel_values, vittle_alpha=0.5).logits.isfinite().all()
