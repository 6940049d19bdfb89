"""Model sources and stages: LLaVA stage 1 from separate pretrained Llama + CLIP directories (only
the projector trains), stage 2 from that export with Vittle added, and the export itself checked
against the final DCP checkpoint."""

from __future__ import annotations

import torch
import transformers
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from test_train_fixtures import tiny_args
from vittle_fast.models import CLIPVisionTower, Llama, llava_from_hf, save_pretrained
from vittle_fast.train.trainer import main


def pretrained_parts(tmp_path, vocab_size):
    """Random 'pretrained' Llama and CLIP directories with the tiny_args dimensions."""
    torch.manual_seed(1)
    llm = Llama(transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=False))
    clip = CLIPVisionTower(transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=16, patch_size=8))
    save_pretrained(llm, tmp_path / "llm")
    save_pretrained(clip, tmp_path / "clip")
    return llm, clip


def test_stage1_from_parts_then_stage2_from_export(data_dir, tmp_path):
    vocab_size = len(transformers.AutoTokenizer.from_pretrained(data_dir / "tokenizer"))
    llm, clip = pretrained_parts(tmp_path, vocab_size)

    main(tiny_args(data_dir, tmp_path / "stage1", "--max_steps", "3", "model.source=hf_parts", "model.stage=1",
                   f"model.llm_path={tmp_path / 'llm'}", f"model.vision_path={tmp_path / 'clip'}",
                   "vittle.enabled=false", "checkpoint.export_safetensors=true"))
    stage1 = llava_from_hf(tmp_path / "stage1" / "export")
    assert stage1.bottleneck is None
    for name, tensor in llm.state_dict().items():  # frozen in stage 1
        assert torch.equal(stage1.language_model.state_dict()[name], tensor), name
    for name, tensor in clip.state_dict().items():
        assert torch.equal(stage1.vision_tower.state_dict()[name], tensor), name

    # The export holds exactly the weights of the final training checkpoint.
    dcp_to_torch_save(tmp_path / "stage1" / "checkpoints" / "step_00000003", tmp_path / "final.pt")
    final = torch.load(tmp_path / "final.pt", weights_only=True)["model"]
    exported = stage1.state_dict()
    assert set(final) <= set(exported)
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor), name
    assert not torch.equal(final["projector.linear_1.weight"], llava_fresh_projector(tmp_path, data_dir))

    main(tiny_args(data_dir, tmp_path / "stage2", "--max_steps", "2", "model.source=hf_llava",
                   f"model.path={tmp_path / 'stage1' / 'export'}", "checkpoint.export_safetensors=true"))
    stage2 = llava_from_hf(tmp_path / "stage2" / "export")
    assert stage2.bottleneck is not None and stage2.bottleneck.config.layer_v == 0
    assert not torch.equal(stage2.language_model.layers[0].mlp.up_proj.weight,
                           stage1.language_model.layers[0].mlp.up_proj.weight)  # the LLM trains in stage 2


def llava_fresh_projector(tmp_path, data_dir):
    """The projector stage 1 starts from (same seed, same construction as the trainer's)."""
    main(tiny_args(data_dir, tmp_path / "stage1_init", "--max_steps", "1", "optim.lr=0.0", "model.source=hf_parts",
                   "model.stage=1", f"model.llm_path={tmp_path / 'llm'}", f"model.vision_path={tmp_path / 'clip'}",
                   "vittle.enabled=false", "checkpoint.export_safetensors=true"))
    return llava_from_hf(tmp_path / "stage1_init" / "export").projector.linear_1.weight
