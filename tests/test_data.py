"""Data pipeline: templates + label masks, image preprocessing, bad records, collator.

Oracles: a word-level tokenizer whose ids are written out by hand (so every expected
``input_ids``/``labels`` list below is hand-computed), hand-normalised pixel values, and
transformers' CLIPImageProcessorPil for the resize/normalise path.
"""
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from tolerances import TOL
from torch.utils.data import DataLoader
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast

from vittle_fast.data import (
    CLIP_MEAN,
    CLIP_STD,
    SKIP_KINDS,
    BadRecordError,
    LlavaCollator,
    LlavaDataset,
    Sample,
    Skipped,
    preprocess_image,
)

IMAGE_SIZE, PATCH_SIZE = 4, 2  # -> num_image_tokens = (4 // 2) ** 2 = 4
N_IMG = 4
WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "Sys", "USER:", "ASSISTANT:", "What", "colour?",
         "red", "How", "many?", "two", "<|begin_of_text|>", "<|start_header_id|>",
         "<|end_header_id|>", "<|eot_id|>", "user", "assistant", "system", "blue", "word"]
V = {word: i for i, word in enumerate(WORDS)}
IMG, IGN = V["<image>"], -100
# Llama-3's chat template (as published with Meta-Llama-3-8B-Instruct).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"},
]


def build_word_tokenizer(bos="<s>", eos="</s>", chat_template=None):
    """Whitespace word-level tokenizer: token ids are positions in WORDS, checkable by hand."""
    backend = Tokenizer(models.WordLevel(V, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = ["<image>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token=bos,
                                        eos_token=eos, pad_token="<pad>", extra_special_tokens=extra)
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def word_tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def llama3_tokenizer():
    return build_word_tokenizer("<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE)


def make_dataset(records, tokenizer, **kwargs):
    kwargs = {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "system_prompt": "Sys", **kwargs}
    return LlavaDataset(records, tokenizer, **kwargs)


def write_png(path, size=(3, 2), colour=(10, 200, 30)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels and holds no pixel data (a bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path.name


# --------------------------------------------------------------------------- templates + labels

def test_vicuna_two_turn_exact_ids_and_label_mask(word_tokenizer, tmp_path):
    write_png(tmp_path / "a.png")
    ds = make_dataset([{"id": "x", "image": "a.png", "conversations": TWO_TURNS}], word_tokenizer,
                      image_folder=tmp_path)
    sample = ds[0]
    # "<s>Sys USER: <image>\nWhat colour? ASSISTANT: red</s>USER: How many? ASSISTANT: two</s>"
    expected_ids = ([V["<s>"], V["Sys"], V["USER:"]] + [IMG] * N_IMG
                    + [V["What"], V["colour?"], V["ASSISTANT:"], V["red"], V["</s>"],
                       V["USER:"], V["How"], V["many?"], V["ASSISTANT:"], V["two"], V["</s>"]])
    expected_labels = ([IGN] * (3 + N_IMG + 3) + [V["red"], V["</s>"]]
                       + [IGN] * 4 + [V["two"], V["</s>"]])
    assert sample.input_ids.tolist() == expected_ids
    assert sample.labels.tolist() == expected_labels
    assert sample.input_ids.dtype == sample.labels.dtype == torch.int64
    assert sample.pixel_values.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_llama3_chat_template_exact_ids_and_label_mask(llama3_tokenizer):
    records = [{"id": "x", "conversations": [
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]}]
    ds = make_dataset(records, llama3_tokenizer, template="chat_template", system_prompt=None)
    sample = ds[0]
    sh, eh, eot = V["<|start_header_id|>"], V["<|end_header_id|>"], V["<|eot_id|>"]
    expected_ids = [V["<|begin_of_text|>"], sh, V["user"], eh, V["What"], V["colour?"], eot,
                    sh, V["assistant"], eh, V["red"], eot,
                    sh, V["user"], eh, V["How"], V["many?"], eot,
                    sh, V["assistant"], eh, V["two"], eot]
    expected_labels = [IGN] * 10 + [V["red"], eot] + [IGN] * 9 + [V["two"], eot]
    assert sample.input_ids.tolist() == expected_ids
    assert sample.labels.tolist() == expected_labels
    assert sample.pixel_values.shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_llama3_chat_template_system_prompt_and_image(llama3_tokenizer, tmp_path):
    write_png(tmp_path / "a.png")
    records = [{"image": "a.png", "conversations": TWO_TURNS[:2]}]
    ds = make_dataset(records, llama3_tokenizer, template="chat_template", system_prompt="Sys",
                      image_folder=tmp_path)
    sh, eh, eot = V["<|start_header_id|>"], V["<|end_header_id|>"], V["<|eot_id|>"]
    expected_ids = ([V["<|begin_of_text|>"], sh, V["system"], eh, V["Sys"], eot, sh, V["user"], eh]
                    + [IMG] * N_IMG + [V["What"], V["colour?"], eot, sh, V["assistant"], eh,
                                       V["red"], eot])
    sample = ds[0]
    assert sample.input_ids.tolist() == expected_ids
    assert sample.labels.tolist() == [IGN] * (len(expected_ids) - 2) + [V["red"], eot]


def test_non_incremental_chat_template_is_a_config_error():
    # Renders the last message first: a later render does not extend an earlier one.
    tokenizer = build_word_tokenizer(
        chat_template="{% for m in messages|reverse %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(ValueError, match="incrementally"):  # at construction, not per record
        make_dataset([{"conversations": TWO_TURNS[2:] + TWO_TURNS[2:]}], tokenizer,
                     template="chat_template")


def test_byte_level_bpe_labels_decode_to_the_replies(tmp_path):
    """With a real byte-level BPE (the demo's), the target tokens spell exactly the replies."""
    from vittle_fast.data.demo import train_tokenizer

    records = [{"id": "x", "conversations": TWO_TURNS}] * 3
    tokenizer = train_tokenizer(records, vocab_size=300)
    write_png(tmp_path / "a.png")
    ds = LlavaDataset([{"image": "a.png", "conversations": TWO_TURNS}], tokenizer,
                      image_folder=tmp_path, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    sample = ds[0]
    targets = [t for t in sample.labels.tolist() if t != IGN]
    assert tokenizer.decode(targets) == " red</s> two</s>"
    assert tokenizer.decode(sample.input_ids.tolist()).startswith(
        "<s>A chat between a curious user and an artificial intelligence assistant.")
    assert (sample.input_ids == ds.image_token_id).sum() == N_IMG


def test_truncation_keeps_prefix_and_targets(word_tokenizer):
    ds = make_dataset([{"conversations": TWO_TURNS[2:] + TWO_TURNS[2:]}], word_tokenizer,
                      max_length=8, truncation="truncate")
    sample = ds[0]
    assert sample.truncated
    # <s> Sys USER: How many? ASSISTANT: two </s> | cut
    assert sample.input_ids.tolist() == [V[w] for w in
                                         ["<s>", "Sys", "USER:", "How", "many?", "ASSISTANT:", "two", "</s>"]]
    assert sample.labels.tolist() == [IGN] * 6 + [V["two"], V["</s>"]]


# --------------------------------------------------------------------------- image preprocessing

def normalise_by_hand(rgb):
    return [(value / 255 - mean) / std for value, mean, std in zip(rgb, CLIP_MEAN, CLIP_STD)]


@pytest.mark.parametrize("wide", [True, False])
def test_preprocess_pads_with_clip_mean_colour(wide):
    """A 2x1 (or 1x2) image padded to 2x2: the pad is int(255 * mean) = (122, 116, 104)."""
    red, blue, pad = (255, 0, 0), (0, 0, 255), (122, 116, 104)
    image = Image.new("RGB", (2, 1) if wide else (1, 2))
    image.putdata([red, blue])
    out = preprocess_image(image, image_size=2)
    if wide:  # image on the top row (offset (2 - 1) // 2 = 0), padding below
        grid = [[red, blue], [pad, pad]]
    else:  # image in the left column, padding right
        grid = [[red, pad], [blue, pad]]
    expected = torch.tensor([[normalise_by_hand(px) for px in row] for row in grid],
                            dtype=torch.float32).permute(2, 0, 1)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    torch.testing.assert_close(out, expected, **TOL["float32"])


def test_preprocess_matches_clip_processor_on_padded_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (5, 9, 3), dtype=np.uint8))  # 9 wide, 5 high
    square = Image.new("RGB", (9, 9), (122, 116, 104))
    square.paste(image, (0, 2))  # (9 - 5) // 2 = 2 rows above
    processor = CLIPImageProcessorPil(size={"shortest_edge": 7}, crop_size={"height": 7, "width": 7})
    expected = processor(square, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(preprocess_image(image, 7), expected, **TOL["float32"])


def test_preprocess_validates_arguments():
    with pytest.raises(TypeError, match="image"):
        preprocess_image(np.zeros((2, 2, 3)), 2)
    with pytest.raises(ValueError, match="image_size"):
        preprocess_image(Image.new("RGB", (2, 2)), 0)


# --------------------------------------------------------------------------- bad records

def bad_records(tmp_path):
    """(record, expected kind or None) pairs covering every skip kind."""
    good_png = write_png(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:60])
    one_turn = TWO_TURNS[:2]
    long_text = [{"from": "human", "value": "word " * 40}, {"from": "gpt", "value": "red"}]
    return [
        ({"image": good_png, "conversations": one_turn}, None),
        ({"conversations": TWO_TURNS[2:]}, None),
        ({"image": "absent.png", "conversations": one_turn}, "missing_image"),
        ({"image": "garbage.png", "conversations": one_turn}, "corrupt_image"),
        ({"image": "truncated.png", "conversations": one_turn}, "corrupt_image"),
        ("not a dict", "malformed"),
        ({"conversations": "What colour?"}, "malformed"),
        ({"conversations": []}, "malformed"),
        ({"conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "x"}]},
         "malformed"),
        ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "red"}]},
         "malformed"),
        ({"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "red"}]},
         "malformed"),
        ({"conversations": TWO_TURNS[:3]}, "malformed"),  # ends without a reply
        ({"conversations": one_turn}, "malformed"),  # <image> but no image
        ({"image": good_png, "conversations": TWO_TURNS[2:]}, "malformed"),  # image, no <image>
        ({"image": 7, "conversations": one_turn}, "malformed"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}]},
         "malformed"),
        ({"conversations": [{"from": "human", "value": "What colour?"}]}, "no_assistant"),
        ({"image": good_png, "conversations": [{"from": "human", "value": "<image>"}] * 2},
         "no_assistant"),
        ({"image": good_png, "conversations": [{"from": "human", "value": "word " * 40 + "<image>"},
                                               {"from": "gpt", "value": "red"}]}, "too_long"),
        ({"conversations": long_text}, "too_long"),  # the reply lies beyond max_length
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "\ud800"}]},
         "bad_text"),  # valid JSON; the tokenizer raises TypeError on a lone surrogate
        ({"image": png_header_only(tmp_path / "bomb.png", 10_000, 10_000), "conversations": one_turn},
         "image_too_large"),
    ]


# Every kind but "truncated" (a kept record; only with truncation="truncate") drops the record.
DROPPED_KINDS = [kind for kind in SKIP_KINDS if kind != "truncated"]


def test_each_bad_record_kind_is_skipped_and_counted(word_tokenizer, tmp_path):
    cases = bad_records(tmp_path)
    ds = make_dataset([record for record, _ in cases], word_tokenizer, image_folder=tmp_path,
                      max_length=30)
    items = [ds[i] for i in range(len(ds))]
    for i, (item, (_, kind)) in enumerate(zip(items, cases)):
        if kind is None:
            assert isinstance(item, Sample), item
        else:
            assert isinstance(item, Skipped) and item.kind == kind and item.index == i, (i, item)
    batch = LlavaCollator.from_dataset(ds)(items)
    expected = [sum(kind == k for _, kind in cases) for k in SKIP_KINDS]
    assert batch["n_skipped"].tolist() == expected
    assert min(expected[SKIP_KINDS.index(k)] for k in DROPPED_KINDS) >= 1
    assert batch["input_ids"].shape[0] == 2


def test_strict_raises_on_each_bad_record_kind(word_tokenizer, tmp_path):
    cases = bad_records(tmp_path)
    ds = make_dataset([record for record, _ in cases], word_tokenizer, image_folder=tmp_path,
                      max_length=30, strict=True)
    for i, (_, kind) in enumerate(cases):
        if kind is None:
            assert isinstance(ds[i], Sample)
        else:
            with pytest.raises(BadRecordError) as info:
                ds[i]
            assert info.value.kind == kind and f"record {i}" in str(info.value)


def test_counts_survive_dataloader_workers(word_tokenizer, tmp_path):
    cases = bad_records(tmp_path)
    records = [record for record, _ in cases]
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = make_dataset(tmp_path / "data.json", word_tokenizer, max_length=30)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=LlavaCollator.from_dataset(ds))
    batches = list(loader)
    total = sum(batch["n_skipped"] for batch in batches)
    assert total.tolist() == [sum(kind == k for _, kind in cases) for k in SKIP_KINDS]
    assert sum(batch["input_ids"].shape[0] for batch in batches) == 2


def test_dataset_validates_arguments(word_tokenizer):
    with pytest.raises(ValueError, match="template"):
        make_dataset([], word_tokenizer, template="alpaca")
    with pytest.raises(ValueError, match="max_length"):
        make_dataset([], word_tokenizer, max_length=0)
    with pytest.raises(ValueError, match="patch_size"):
        make_dataset([], word_tokenizer, image_size=5)
    with pytest.raises(TypeError, match="data"):
        make_dataset(42, word_tokenizer)


# --------------------------------------------------------------------------- collator

def hand_sample(ids, labels, n_images=0):
    pixels = torch.arange(n_images * 3 * 2 * 2, dtype=torch.float32).reshape(n_images, 3, 2, 2)
    return Sample(torch.tensor(ids), torch.tensor(labels), pixels)


PAD_ID, IMG_ID = 0, 9
SAMPLE_A = hand_sample([1, 9, 9, 5, 6], [IGN, IGN, IGN, IGN, 6], n_images=1)
SAMPLE_B = hand_sample([1, 7, 8], [IGN, 7, 8])


def test_collator_right_pads_with_modality_ids():
    collate = LlavaCollator(pad_token_id=PAD_ID, image_token_id=IMG_ID, image_size=2)
    batch = collate([SAMPLE_A, Skipped(2, "too_long", ""), SAMPLE_B])
    assert batch["input_ids"].tolist() == [[1, 9, 9, 5, 6], [1, 7, 8, 0, 0]]
    assert batch["labels"].tolist() == [[IGN, IGN, IGN, IGN, 6], [IGN, 7, 8, IGN, IGN]]
    assert batch["attention_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert batch["modality_ids"].tolist() == [[1, 2, 2, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["modality_ids"].dtype == torch.int8
    assert batch["attention_mask"].dtype == torch.bool
    torch.testing.assert_close(batch["pixel_values"], SAMPLE_A.pixel_values, rtol=0, atol=0)
    assert batch["n_skipped"].tolist() == [int(k == "too_long") for k in SKIP_KINDS]
    # attention layout: row 0 (5 tokens), row 1 (3 tokens + a padding run of 2)
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 10] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 5 and type(batch["max_seqlen"]) is int


def test_collator_packs_with_restarting_positions():
    collate = LlavaCollator(pad_token_id=PAD_ID, image_token_id=IMG_ID, image_size=2, pack=True,
                            pad_to_multiple_of=4)
    image_b = hand_sample([1, 9, 9, 4], [IGN, IGN, IGN, 4], n_images=1)
    image_b.pixel_values += 100
    batch = collate([SAMPLE_A, SAMPLE_B, image_b])
    assert batch["input_ids"].tolist() == [[1, 9, 9, 5, 6, 1, 7, 8, 1, 9, 9, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[IGN, IGN, IGN, IGN, 6, IGN, 7, 8, IGN, IGN, IGN, 4]]
    assert batch["modality_ids"].tolist() == [[1, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 1]]
    # pixel_values follow the order of the image tokens in the flattened batch
    torch.testing.assert_close(batch["pixel_values"],
                               torch.cat([SAMPLE_A.pixel_values, image_b.pixel_values]))
    padded = collate([SAMPLE_A, SAMPLE_B, hand_sample([1, 3], [IGN, 3])])
    assert padded["input_ids"].tolist() == [[1, 9, 9, 5, 6, 1, 7, 8, 1, 3, 0, 0]]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert padded["attention_mask"].tolist() == [[True] * 10 + [False] * 2]
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 12] and batch["max_seqlen"] == 5
    assert padded["cu_seqlens"].tolist() == [0, 5, 8, 10, 12] and padded["max_seqlen"] == 5


@pytest.mark.parametrize("pack", [False, True])
def test_collator_all_skipped_gives_empty_batch(pack):
    collate = LlavaCollator(pad_token_id=PAD_ID, image_token_id=IMG_ID, image_size=2, pack=pack)
    batch = collate([Skipped(0, "malformed", ""), Skipped(1, "missing_image", "")])
    assert batch["input_ids"].shape == (0, 0) and batch["pixel_values"].shape == (0, 3, 2, 2)
    assert batch["n_skipped"].sum() == 2
    assert batch["cu_seqlens"].tolist() == [0] and batch["max_seqlen"] == 0


def test_collator_validates_arguments():
    with pytest.raises(ValueError, match="pad_token_id"):
        LlavaCollator(pad_token_id=-1, image_token_id=IMG_ID, image_size=2)
    with pytest.raises(ValueError, match="image_size"):
        LlavaCollator(pad_token_id=PAD_ID, image_token_id=IMG_ID, image_size=0)
    with pytest.raises(TypeError, match="Sample or Skipped"):
        LlavaCollator(pad_token_id=PAD_ID, image_token_id=IMG_ID, image_size=2)([{"input_ids": 1}])
