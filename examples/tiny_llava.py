"""Shared by the two examples: the synthetic demo set (made locally, nothing downloaded) and a tiny random
``transformers.LlavaForConditionalGeneration`` sized for it, with Vittle attached by ``apply_vittle``."""
from __future__ import annotations

import torch
import transformers

from vittle_fast.data import LlavaCollator, LlavaDataset
from vittle_fast.data.demo import make_demo_dataset
from vittle_fast.integrations.transformers import apply_vittle
from vittle_fast.nn import VittleConfig

IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 image tokens per image
HF_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")


def demo_data(out_dir: str, n_train: int = 256) -> tuple[LlavaDataset, LlavaCollator]:
    paths = make_demo_dataset(out_dir, n_train=n_train, n_val=0, n_contrast=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths.tokenizer_dir)
    dataset = LlavaDataset(paths.train_json, tokenizer, image_folder=paths.image_folder, image_size=IMAGE_SIZE,
                           patch_size=PATCH_SIZE, max_length=160)
    return dataset, LlavaCollator.from_dataset(dataset)


def hf_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collator's batch as LlavaForConditionalGeneration's keyword inputs."""
    batch = {name: batch[name] for name in HF_INPUTS}
    batch["attention_mask"] = batch["attention_mask"].long()
    if batch["pixel_values"].shape[0] == 0:  # a text-only batch
        del batch["pixel_values"]
    return batch


def tiny_llava_with_vittle(dataset: LlavaDataset, vittle: VittleConfig) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=len(dataset.tokenizer), hidden_size=64, intermediate_size=172,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512)
    vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=dataset.image_token_id,
                                      image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    model = transformers.LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)  # LLaVA stage 2: CLIP stays frozen
    return apply_vittle(model, vittle)
