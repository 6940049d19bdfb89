"""The trainer's performance instruments: TrainingFlops (the MFU numerator) against a count done by
hand for a tiny LLaVA; the profiler switch writes a trace; the per-step data-wait metric."""
import json

import pytest
import torch
import transformers

from vittle_fast.models import LlavaVittle
from vittle_fast.nn import VittleConfig
from test_train_fixtures import make_uniform_dataset, tiny_args
from vittle_fast.train.metrics import TrainingFlops, read_metrics
from vittle_fast.train.trainer import main


def tiny_model() -> LlavaVittle:
    text = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                    num_attention_heads=2, num_key_value_heads=1)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    return LlavaVittle(text, vision, image_token_id=31, vittle=VittleConfig(layer_v=1, layer_t=1))


def batch() -> dict[str, torch.Tensor]:
    """Row 0: one sequence of 10 tokens; row 1: two packed sequences (3 + 4 tokens), 3 padding."""
    attention_mask = torch.ones(2, 10, dtype=torch.bool)
    attention_mask[1, 7:] = False
    position_ids = torch.tensor([list(range(10)), [0, 1, 2, 0, 1, 2, 3, 0, 0, 0]])
    return {"attention_mask": attention_mask, "position_ids": position_ids,
            "pixel_values": torch.zeros(2, 3, 16, 16)}


# Multiply-adds per row, counted from the configs above (weights only):
BLOCK = 3 * (16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 16 * 32)  # 3 blocks: q, k, v (1 kv head of 8), o, MLP
HEAD = 16 * 32
PROJ_1, PROJ_2 = 16 * 16, 16 * 16
VISION_BLOCK = 4 * 16 * 16 + 2 * 16 * 32  # the one block before the feature layer (-2 of 2)
PATCH_EMBED = 3 * 8 * 8 * 16
MLP = 16 * 16 + 16 * 32  # one bottleneck MLP
TOKENS, PAIRS, IMAGES, PATCHES, TARGETS = 17, sum(range(1, 11)) + (1 + 2 + 3) + (1 + 2 + 3 + 4), 2, 4, 5


@pytest.mark.parametrize("stage,fused", [(2, True), (2, False), (1, True)])
def test_flops_match_hand_count(stage, fused):
    model = tiny_model()
    model.fused_cross_entropy = fused
    if stage == 1:  # decoder and LM head frozen: forward + input gradient only (the projector trains)
        model.language_model.requires_grad_(False)
    dense = 6 if stage == 2 else 4  # 2 FLOPs x (forward, input grad, weight grad)
    visual = IMAGES * PATCHES
    expected = (
        dense * BLOCK * TOKENS
        + 3 * 4 * 16 * 3 * PAIRS  # causal attention: scores + values, forward + 2x backward, 3 layers
        + dense * HEAD * (TARGETS if fused else TOKENS)
        + 2 * (2 * PROJ_1 + 3 * PROJ_2) * visual  # no input gradient into the frozen tower
        + IMAGES * 2 * (PATCH_EMBED * PATCHES + VISION_BLOCK * (1 + PATCHES) + 2 * 16 * (1 + PATCHES) ** 2)
        + 6 * MLP * visual + 6 * MLP * (TOKENS - visual)
    )
    got = TrainingFlops(model).micro_batch(batch(), torch.tensor(TARGETS))
    assert got.dtype == torch.float64
    assert got.item() == expected


def test_profile_steps_write_a_trace_and_metrics_have_data_wait(tmp_path):
    make_uniform_dataset(tmp_path / "data")
    main(tiny_args(tmp_path / "data", tmp_path / "run", "--max_steps", "3", "logging.profile_steps=[2,3]"))
    trace = tmp_path / "run" / "profile" / "rank0.steps2-3.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    marked = {e["name"] for e in events if e.get("name", "").startswith("train_step#")}
    assert marked == {"train_step#2", "train_step#3"}
    assert any(e.get("name") == "aten::mm" for e in events)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["data_wait_ms"] > 0 and r["tflops_per_s"] > 0 for r in records)
