"""Shared fixtures of the trainer tests (no tests here): a word-level tokenizer and a small
LLaVA-format data set whose records all have the same token structure, so per-micro-batch KL
means average to the same value however the global batch is split over ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
SYSTEM_WORDS = ("A chat between a curious user and an artificial intelligence assistant . The assistant "
                "gives helpful , detailed , and polite answers to the user ' s questions . USER : ASSISTANT")
QUESTION = "What color is the square ?"


def make_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = sorted(set(SYSTEM_WORDS.split()) | set(QUESTION.split()) | set(COLORS) | {"yes", "no", "Is", "it"})
    vocab = {token: i for i, token in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])
    fast.save_pretrained(directory)


def make_uniform_dataset(directory: Path, num_records: int = 16, image_size: int = 16) -> Path:
    """Records "<image> What color is the square ?" -> one colour word, all the same length."""
    directory.mkdir(parents=True, exist_ok=True)
    make_tokenizer(directory / "tokenizer")
    records = []
    names = list(COLORS)
    for i in range(num_records):
        color = names[i % len(names)]
        image = Image.new("RGB", (image_size, image_size), (128, 128, 128))
        image.paste(COLORS[color], (i % 5, i % 3, i % 5 + 8, i % 3 + 8))
        image.save(directory / f"img_{i}.png")
        records.append({"id": str(i), "image": f"img_{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": color}]})
    path = directory / "train.json"
    path.write_text(json.dumps(records))
    return path


def tiny_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Command-line overrides of a tiny fp32 run on the uniform data set."""
    return [
        "--output_dir", str(output_dir),
        f"data.data_path={data_dir / 'train.json'}", f"data.image_folder={data_dir}",
        f"data.tokenizer={data_dir / 'tokenizer'}", "data.demo=false", "data.max_length=96",
        "data.micro_batch_size=1", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
        "model.num_heads=2", "model.num_kv_heads=1", "model.vision_hidden_size=16",
        "model.vision_intermediate_size=32", "model.vision_layers=2", "model.vision_heads=2",
        "model.image_size=16", "model.patch_size=8", "vittle.layer_v=0", "vittle.layer_t=0", "vittle.backend=reference",
        "optim.lr=1e-3", "optim.warmup_steps=1", "parallel.param_dtype=float32", "logging.log_every=1",
        "logging.progress_bar=false", "logging.plot=false", "checkpoint.export_safetensors=false",
        *extra,
    ]


def torchrun(nproc: int, args: list[str], timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "vittle_fast.train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **popen)
