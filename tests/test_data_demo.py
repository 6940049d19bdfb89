"""Demo data: deterministic given the seed, answers grounded in the pixels, a tokenizer that
round-trips and keeps <image> whole, and the full pipeline (dataset -> sampler -> workers -> batch)."""
import json

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from vittle_fast.data import IMAGE_PLACEHOLDER, LengthGroupedSampler, LlavaCollator, LlavaDataset
from vittle_fast.data.demo import COLOURS, SHAPES, main, make_demo_dataset

SMALL = dict(n_train=60, n_val=12, image_size=32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", seed=3, **SMALL)


def tree_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_given_seed(demo, tmp_path):
    again = make_demo_dataset(tmp_path / "again", seed=3, **SMALL)
    other = make_demo_dataset(tmp_path / "other", seed=4, **SMALL)
    assert tree_bytes(demo.root) == tree_bytes(again.root)
    assert demo.train_json.read_bytes() != other.train_json.read_bytes()


def test_reuses_matching_set_and_refuses_to_clobber(demo):
    stamp = demo.train_json.stat().st_mtime_ns
    assert make_demo_dataset(demo.root, seed=3, **SMALL) == demo
    assert demo.train_json.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="overwrite"):
        make_demo_dataset(demo.root, seed=5, **SMALL)


def objects_in(pixels, image_size):
    """Independent reading of a demo image: colour -> (shape, quadrant).

    The shape comes from how much of its bounding box a colour fills (square 1, circle pi/4,
    triangle 1/2), the quadrant from its centroid.
    """
    fill_ratios = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    found = {}
    for name, rgb in COLOURS.items():
        ys, xs = np.nonzero((pixels == rgb).all(-1))
        if len(xs):
            ratio = len(xs) / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
            shape = min(fill_ratios, key=lambda s: abs(fill_ratios[s] - ratio))
            vertical = "top" if ys.mean() < image_size / 2 else "bottom"
            horizontal = "left" if xs.mean() < image_size / 2 else "right"
            found[name] = (shape, f"{vertical} {horizontal}")
    return found


def expected_answer(question, objects):
    words = question.rstrip("?").split()
    by_shape = {shape: colour for colour, (shape, _) in objects.items()}
    if question.startswith("What colour is the"):
        return by_shape[words[4]]
    if question.startswith("What shape is the"):
        return objects[words[4]][0]
    if question.startswith("Is there a"):
        return "Yes" if objects.get(words[3], (None,))[0] == words[4] else "No"
    assert question.startswith("Where is the")
    return objects[words[3]][1]


def test_answers_are_grounded_in_the_image(demo):
    records = json.loads(demo.train_json.read_text()) + json.loads(demo.val_json.read_text())
    assert len(records) == SMALL["n_train"] + SMALL["n_val"]
    answers = []
    for record in records:
        turns = record["conversations"]
        if "image" not in record:
            a, b = (int(w.rstrip("?")) for w in turns[0]["value"].split()[2::2])
            assert turns[1]["value"] == str(a + b)
            continue
        assert turns[0]["value"].startswith(IMAGE_PLACEHOLDER + "\n")
        pixels = np.asarray(Image.open(demo.image_folder / record["image"]).convert("RGB"))
        objects = objects_in(pixels, SMALL["image_size"])
        for question, answer in zip(turns[0::2], turns[1::2]):
            text = question["value"].removeprefix(IMAGE_PLACEHOLDER + "\n")
            assert answer["value"] == expected_answer(text, objects), (record["id"], text)
            answers.append(answer["value"])
    assert {"Yes", "No", *SHAPES} <= set(answers)
    assert any(not record.get("image") for record in records)  # text-only records exist


def test_tokenizer_round_trips_and_keeps_image_token_whole(demo):
    tokenizer = AutoTokenizer.from_pretrained(demo.tokenizer_dir)
    assert tokenizer.is_fast and len(tokenizer) <= 1024
    assert [tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token] == \
        ["<unk>", "<s>", "</s>", "<pad>"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert image_id != tokenizer.unk_token_id
    text = "<image>\nIs there a red circle in the image? ASSISTANT: Yes</s>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == 1 and ids[0] == image_id
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == text
    for unseen in ["Zebra crossing: 42 €!", "  two spaces\tand a tab"]:  # byte-level: no <unk>
        unseen_ids = tokenizer(unseen, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in unseen_ids and tokenizer.decode(unseen_ids) == unseen


def test_cli_writes_the_set(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--n_train", "5", "--n_val", "2", "--seed", "1",
          "--image_size", "16"])
    assert "train_json" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "cli" / "val.json").read_text())) == 2


def test_pipeline_with_workers(demo):
    tokenizer = AutoTokenizer.from_pretrained(demo.tokenizer_dir)
    ds = LlavaDataset(demo.train_json, tokenizer, image_folder=demo.image_folder, image_size=16,
                      patch_size=8, max_length=128)
    sampler = LengthGroupedSampler(ds.lengths, ds.is_multimodal, batch_size=4, num_replicas=2, rank=1)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2,
                        collate_fn=LlavaCollator.from_dataset(ds))
    n_rows = 0
    for batch in loader:
        n_image_tokens = (batch["input_ids"] == ds.image_token_id).sum()
        assert n_image_tokens == batch["pixel_values"].shape[0] * ds.num_image_tokens
        assert batch["pixel_values"].shape[1:] == (3, 16, 16)
        assert batch["n_skipped"].sum() == 0
        assert ((batch["labels"] != -100).sum(1) > 0).all()
        n_rows += batch["input_ids"].shape[0]
    assert n_rows == len(sampler)


def test_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        make_demo_dataset(tmp_path / "x", n_train=0)
    with pytest.raises(ValueError, match="image_size"):
        make_demo_dataset(tmp_path / "x", image_size=True)
