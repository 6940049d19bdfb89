"""One source per fact on the way to a model: the trainer's vittle section is VittleConfig's fields and
validation; llava_from_hf's explicit "no bottleneck"; one IGNORE_INDEX."""
import dataclasses
import re
from pathlib import Path

import torch
import transformers

from vittle_fast.data import IGNORE_INDEX
from vittle_fast.models import LlavaVittle, llava_from_hf, save_pretrained
from vittle_fast.models import llava as llava_module
from vittle_fast.nn import VittleConfig
from vittle_fast.train.build import vittle_config
from vittle_fast.train.config import TrainConfig, apply_overrides


def test_vittle_section_has_every_vittle_config_field_with_its_default():
    section = {f.name: f for f in dataclasses.fields(TrainConfig().vittle)}
    for f in dataclasses.fields(VittleConfig):
        if f.name == "alpha":  # set from the alpha schedule's end, not an option
            assert f.name not in section
        elif f.name in ("layer_v", "layer_t"):
            assert section[f.name].default == -1  # = 3/4 depth
        else:
            assert section[f.name].default == f.default, f.name
            assert section[f.name].metadata["help"] == f.metadata["help"], f.name


def test_vittle_section_values_are_validated_by_vittle_config():
    cfg = apply_overrides(TrainConfig(), {"data.demo": True, "vittle.beta_t": -1.0})
    assert "vittle.beta_t must be >= 0, got -1.0" in cfg.errors()
    cfg = apply_overrides(TrainConfig(), {"vittle.prior": "learnable", "vittle.fused_mlp": False, "max_steps": 10})
    built = vittle_config(cfg, num_layers=8)
    assert (built.layer_v, built.prior, built.fused_mlp, built.alpha) == (6, "learnable", False, 0.5)


def test_llava_from_hf_explicit_no_bottleneck(tmp_path):
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    vision = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    save_pretrained(LlavaVittle(text, vision, 63, VittleConfig(layer_v=1, layer_t=1)), tmp_path)
    assert llava_from_hf(tmp_path).bottleneck is not None
    plain = llava_from_hf(tmp_path, vittle=False)  # strict load: the bottleneck.* keys are skipped, not unknown
    assert plain.bottleneck is None and not any("bottleneck" in name for name, _ in plain.named_parameters())
    assert torch.equal(plain.projector.linear_1.weight, llava_from_hf(tmp_path).projector.linear_1.weight)


def test_one_ignore_index():
    """Defined once (data/conversation.py); the model's CE and KL masks use that object."""
    root = Path(__file__).resolve().parents[1] / "vittle_fast"
    definitions = [path for path in root.rglob("*.py") if re.search(r"^IGNORE_INDEX\s*=", path.read_text(), re.M)]
    assert [path.name for path in definitions] == ["conversation.py"]
    assert llava_module.IGNORE_INDEX is IGNORE_INDEX == -100
