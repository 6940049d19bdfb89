"""Qwen2, the second model family: our slim decoder vs transformers.Qwen2ForCausalLM (MHA, GQA, tied
embeddings, rope theta), LLaVA with a Qwen2 LLM vs transformers' LLaVA, export and reload."""
import pytest
import torch
import transformers
from tolerances import TOL

from vittle_fast.models import (
    FAMILIES,
    LlavaVittle,
    build_text_model,
    family_of,
    llava_from_hf,
    save_pretrained,
    text_model_from_hf,
)
from vittle_fast.models.llama import Llama
from vittle_fast.nn import VittleConfig

VOCAB, IMAGE_TOKEN = 64, 63
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa_tied_theta": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="default", rope_theta=1_000_000.0)),
}


def qwen2_config(**overrides) -> transformers.Qwen2Config:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return transformers.Qwen2Config(**{**fields, **overrides})


def randomize_biases(model: torch.nn.Module) -> None:
    """HF initialises biases to zero; random ones make the q/k/v-bias parity test bite."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_qwen2(tmp_path, name):
    hf = transformers.Qwen2ForCausalLM(qwen2_config(**CONFIGS[name])).eval()
    randomize_biases(hf)
    hf.save_pretrained(tmp_path)
    ours = text_model_from_hf(tmp_path).eval()
    attn = ours.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias is not None and attn.o_proj.bias is None
    assert ours.layers[0].mlp.up_proj.bias is None
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == hf.config.tie_word_embeddings
    input_ids = torch.randint(0, VOCAB, (2, 40))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask).logits
        got = ours(input_ids, attention_mask=attention_mask.bool())
    torch.testing.assert_close(got[0], expected[0], **TOL["float32"])
    torch.testing.assert_close(got[1, :30], expected[1, :30], **TOL["float32"])


def test_qwen2_export_loads_in_transformers_and_back(tmp_path):
    ours = build_text_model(qwen2_config(tie_word_embeddings=True)).eval()
    randomize_biases(ours)
    save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    reloaded = text_model_from_hf(tmp_path).eval()
    input_ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids).logits, ours(input_ids), **TOL["float32"])
        torch.testing.assert_close(reloaded(input_ids), ours(input_ids), rtol=0, atol=0)


def vision_config():
    return transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14)


def test_llava_with_a_qwen2_llm_matches_transformers(tmp_path):
    """LLaVA-OneVision-style single-image path: CLIP -> mlp2x_gelu -> Qwen2, both directions."""
    config = transformers.LlavaConfig(text_config=qwen2_config(), vision_config=vision_config(),
                                      image_token_index=IMAGE_TOKEN)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    randomize_biases(hf.model.language_model)
    hf.save_pretrained(tmp_path / "hf")
    ours = llava_from_hf(tmp_path / "hf").eval()
    assert family_of(ours.language_model.config).name == "qwen2"
    input_ids = torch.randint(0, IMAGE_TOKEN, (1, 11))
    input_ids[0, 3:7] = IMAGE_TOKEN
    pixel_values = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, pixel_values=pixel_values).logits
        torch.testing.assert_close(ours(input_ids, pixel_values=pixel_values).logits, expected, **TOL["float32"])

    with_vittle = LlavaVittle(qwen2_config(), vision_config(), IMAGE_TOKEN, VittleConfig(layer_v=1, layer_t=1))
    save_pretrained(with_vittle, tmp_path / "ours")
    assert llava_from_hf(tmp_path / "ours").bottleneck.config == with_vittle.bottleneck.config
    hf_loaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert type(hf_loaded.model.language_model).__name__ == "Qwen2Model"


def test_registry_names_every_family_and_refuses_others():
    assert {"llama", "qwen2"} <= set(FAMILIES)
    assert family_of(qwen2_config()).hf_classes == ("Qwen2ForCausalLM",)
    with pytest.raises(ValueError, match="'mistral' is not a registered family"):
        family_of(transformers.MistralConfig())
    with pytest.raises(ValueError, match="build_text_model"):
        Llama(qwen2_config())  # would silently drop the q/k/v biases
    with pytest.raises(ValueError, match="use_sliding_window"):
        build_text_model(qwen2_config(use_sliding_window=True, sliding_window=8))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen2's ChatML, minus the default system turn


def test_trainer_fine_tunes_llava_from_a_qwen2_directory(tmp_path):
    """model.source=hf_parts with a Qwen2 LLM directory and its ChatML template: trains, exports, reloads."""
    from test_train_fixtures import make_uniform_dataset, tiny_args

    from vittle_fast.models import CLIPVisionTower
    from vittle_fast.train.trainer import main

    data_dir = tmp_path / "data"
    make_uniform_dataset(data_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(data_dir / "tokenizer")
    llm = build_text_model(qwen2_config(vocab_size=len(tokenizer), num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=True))
    randomize_biases(llm)
    save_pretrained(llm, tmp_path / "qwen2")
    save_pretrained(CLIPVisionTower(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8)), tmp_path / "clip")
    main(tiny_args(data_dir, tmp_path / "run", "--max_steps", "4", "model.source=hf_parts",
                   f"model.llm_path={tmp_path / 'qwen2'}", f"model.vision_path={tmp_path / 'clip'}",
                   "data.template=chat_template", "checkpoint.export_safetensors=true"))
    exported = llava_from_hf(tmp_path / "run" / "export")
    assert family_of(exported.language_model.config).name == "qwen2" and exported.bottleneck is not None
    assert exported.language_model.lm_head.weight is exported.language_model.embed_tokens.weight
    assert not torch.equal(exported.language_model.layers[0].self_attn.q_proj.bias, llm.layers[0].self_attn.q_proj.bias)
