"""Synthetic visual-QA demo data and a locally trained tokenizer, so the demo needs no download.

Images show one shape (circle, square or triangle) in one of four colours in one quadrant; each image
record asks, in random order, its colour, its shape, its position and -- in the style of POPE --
whether a given coloured shape is present. Every answer is a deterministic function of the image (or,
for the text-only arithmetic records, of the question) from a small answer set. The evaluation files
(``val_questions.jsonl``, ``contrast_questions.jsonl``) are LLaVA question JSONL.

    python -m vittle_fast.data.demo --out DIR [--n_train N --n_val M --seed S --image_size P --n_contrast K]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .conversation import IMAGE_PLACEHOLDER, VICUNA_V1_SYSTEM, render_vicuna_v1
from .errors import check_int

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER)
BACKGROUND = (245, 245, 245)
TEXT_ONLY_FRACTION = 0.1
INFO_FILE = "demo_info.json"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class DemoObject:
    shape: str
    colour: str
    quadrant: str


@dataclass(frozen=True)
class DemoPaths:
    """Where ``make_demo_dataset`` put things (images are relative to ``image_folder``)."""

    root: Path
    train_json: Path
    val_json: Path
    image_folder: Path
    tokenizer_dir: Path
    val_questions: Path  # val.json's turns as LLaVA question lines (python -m vittle_fast.eval)
    contrast_questions: Path  # image-dependent pairs: same question, two images, different answers


def random_scene(rng: random.Random) -> list[DemoObject]:
    """One object: a tiny model learns to read its colour within the demo budget, which it does not
    for scenes of two or three objects, where each answer first needs the right object found
    (docs/data.md)."""
    return [DemoObject(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(QUADRANTS)))]


def render_scene(scene: list[DemoObject], image_size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half, radius, jitter = image_size / 2, image_size / 6, image_size / 16
    for obj in scene:
        column, row = QUADRANTS[obj.quadrant]
        cx = half * column + half / 2 + rng.uniform(-jitter, jitter)
        cy = half * row + half / 2 + rng.uniform(-jitter, jitter)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                         fill=colour)
    return image


def _ask_colour(scene, rng):
    obj = rng.choice(scene)
    return f"What colour is the {obj.shape}?", obj.colour


def _ask_shape(scene, rng):
    obj = rng.choice(scene)
    return f"What shape is the {obj.colour} object?", obj.shape


def _ask_position(scene, rng):
    obj = rng.choice(scene)
    return f"Where is the {obj.colour} {obj.shape}?", obj.quadrant


def _ask_presence(scene, rng):
    """POPE-style yes/no question, half of them about an absent colour-shape pair."""
    present = {(obj.colour, obj.shape) for obj in scene}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        colour, shape = rng.choice([(c, s) for c in sorted(COLOURS) for s in SHAPES
                                    if (c, s) not in present])
    answer = "Yes" if (colour, shape) in present else "No"
    return f"Is there a {colour} {shape} in the image?", answer


QUESTION_KINDS = (_ask_colour, _ask_shape, _ask_position, _ask_presence)
# The question templates above as patterns: kind -> regex whose groups are the question's parameters.
QUESTION_PATTERNS = {
    "colour": re.compile(r"What colour is the (\w+)\?"),
    "shape": re.compile(r"What shape is the (\w+) object\?"),
    "position": re.compile(r"Where is the (\w+) (\w+)\?"),
    "presence": re.compile(r"Is there a (\w+) (\w+) in the image\?"),
    "arithmetic": re.compile(r"What is (\d) plus (\d)\?"),
}


def question_kind(question: str) -> str:
    """The kind of a demo question (``<image>`` and surrounding whitespace ignored)."""
    text = question.replace(IMAGE_PLACEHOLDER, "").strip()
    for kind, pattern in QUESTION_PATTERNS.items():
        if pattern.fullmatch(text):
            return kind
    raise ValueError(f"not a demo question: {question!r}")


def answer_in_scene(question: str, scene: list[DemoObject]) -> str | None:
    """The answer to an image question about ``scene``, or None when it does not apply (it names an
    object the scene lacks)."""
    text = question.replace(IMAGE_PLACEHOLDER, "").strip()
    kind = question_kind(text)
    args = QUESTION_PATTERNS[kind].fullmatch(text).groups()
    if kind == "presence":
        return "Yes" if any((o.colour, o.shape) == args for o in scene) else "No"
    match = {"colour": lambda o: o.shape == args[0], "shape": lambda o: o.colour == args[0],
             "position": lambda o: (o.colour, o.shape) == args}[kind]
    found = [o for o in scene if match(o)]
    if not found:
        return None
    return {"colour": found[0].colour, "shape": found[0].shape, "position": found[0].quadrant}[kind]


def _text_only_conversation(rng: random.Random) -> list[dict]:
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    return [{"from": "human", "value": f"What is {a} plus {b}?"}, {"from": "gpt", "value": str(a + b)}]


def _image_conversation(scene, rng: random.Random) -> list[dict]:
    """Every question kind once, in random order: each turn is a supervised answer, so one image's
    tokens teach four image-dependent answers (what makes the demo learn to read the image)."""
    conversation = []
    for turn, ask in enumerate(rng.sample(QUESTION_KINDS, len(QUESTION_KINDS))):
        question, answer = ask(scene, rng)
        prefix = f"{IMAGE_PLACEHOLDER}\n" if turn == 0 else ""
        conversation += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return conversation


def generate_records(split: str, n: int, image_size: int, image_dir: Path,
                     rng: random.Random) -> list[dict]:
    """Render ``n`` records (writing their PNGs into ``image_dir``) and return their LLaVA JSON."""
    records = []
    for i in range(n):
        record_id = f"{split}-{i:05d}"
        if rng.random() < TEXT_ONLY_FRACTION:
            records.append({"id": record_id, "conversations": _text_only_conversation(rng)})
            continue
        scene = random_scene(rng)
        render_scene(scene, image_size, rng).save(image_dir / f"{record_id}.png")
        records.append({"id": record_id, "image": f"{record_id}.png",
                        "conversations": _image_conversation(scene, rng)})
    return records


def contrast_questions(n_pairs: int, image_size: int, image_dir: Path, rng: random.Random) -> list[dict]:
    """``n_pairs`` pairs of LLaVA question lines (``question_id``/``image``/``text``/``answer``/
    ``category``): the same question about two images whose answers differ, so a model that ignores
    the image answers at most one of each pair -- pair accuracy is 0 without reading the image."""
    lines = []
    while len(lines) < 2 * n_pairs:
        scene_a = random_scene(rng)
        question, answer_a = rng.choice(QUESTION_KINDS)(scene_a, rng)
        for _ in range(100):
            scene_b = random_scene(rng)
            answer_b = answer_in_scene(question, scene_b)
            if answer_b is not None and answer_b != answer_a:
                break
        else:
            continue
        pair = len(lines) // 2
        for side, scene, answer in (("a", scene_a, answer_a), ("b", scene_b, answer_b)):
            name = f"contrast-{pair:04d}-{side}.png"
            render_scene(scene, image_size, rng).save(image_dir / name)
            lines.append({"question_id": f"c{pair:04d}{side}", "image": name, "text": question, "answer": answer,
                          "category": question_kind(question)})
    return lines


def val_question_lines(val: list[dict]) -> list[dict]:
    """Every turn of the validation records as a LLaVA question line with its kind as ``category``."""
    lines = []
    for record in val:
        conversation = record["conversations"]
        for k, (human, reply) in enumerate(zip(conversation[0::2], conversation[1::2])):
            text = human["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            line = {"question_id": f"{record['id']}_{k}", "text": text, "answer": reply["value"],
                    "category": question_kind(text)}
            if "image" in record:
                line["image"] = record["image"]
            lines.append(line)
    return lines


def train_tokenizer(records: list[dict], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the records as the Vicuna-v1 template renders them."""
    def corpus():
        for record in records:
            turns = [(h["value"], g["value"]) for h, g in
                     zip(record["conversations"][0::2], record["conversations"][1::2])]
            text, _ = render_vicuna_v1(turns, VICUNA_V1_SYSTEM, eos_token="")
            yield text.replace(IMAGE_PLACEHOLDER, "")

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=[IMAGE_PLACEHOLDER])


def _paths(root: Path) -> DemoPaths:
    return DemoPaths(root=root, train_json=root / "train.json", val_json=root / "val.json",
                     image_folder=root / "images", tokenizer_dir=root / "tokenizer",
                     val_questions=root / "val_questions.jsonl", contrast_questions=root / "contrast_questions.jsonl")


def _existing_params(root: Path) -> dict | None:
    try:
        return json.loads((root / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def _build(root: Path, params: dict) -> None:
    paths = _paths(root)
    paths.image_folder.mkdir(parents=True)
    rng = random.Random(params["seed"])
    train = generate_records("train", params["n_train"], params["image_size"], paths.image_folder, rng)
    val = generate_records("val", params["n_val"], params["image_size"], paths.image_folder, rng)
    paths.train_json.write_text(json.dumps(train, indent=1))
    paths.val_json.write_text(json.dumps(val, indent=1))
    train_tokenizer(train + val, params["vocab_size"]).save_pretrained(paths.tokenizer_dir)
    contrast_rng = random.Random(f"contrast/{params['seed']}")  # its own stream: train/val stay as they were
    for path, lines in ((paths.val_questions, val_question_lines(val)),
                        (paths.contrast_questions, contrast_questions(params["n_contrast"], params["image_size"],
                                                                      paths.image_folder, contrast_rng))):
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / INFO_FILE).write_text(json.dumps(params, indent=1))  # last: marks the set complete


def make_demo_dataset(out_dir: str | os.PathLike, *, n_train: int = 1000, n_val: int = 200,
                      seed: int = 0, image_size: int = 64, vocab_size: int = 1024, n_contrast: int = 100,
                      overwrite: bool = False) -> DemoPaths:
    """Write the demo set into ``out_dir`` (images/, train.json, val.json, tokenizer/).

    Reuses a complete set made with the same parameters. Builds in a sibling temporary directory
    and renames it into place, so concurrent callers (several ranks) and interrupted runs never
    leave a half-written set behind.
    """
    for name, value, minimum in (("n_train", n_train, 1), ("n_val", n_val, 0), ("seed", seed, 0),
                                 ("image_size", image_size, 8), ("vocab_size", vocab_size, 300),
                                 ("n_contrast", n_contrast, 0)):
        check_int(name, value, minimum)
    params = {"format_version": FORMAT_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed,
              "image_size": image_size, "vocab_size": vocab_size, "n_contrast": n_contrast}
    root = Path(out_dir)
    existing = _existing_params(root)
    if existing == params and not overwrite:
        return _paths(root)
    if existing is not None and existing.get("format_version") != FORMAT_VERSION:
        overwrite = True  # a set made by an older version of this module: a cache, rebuilt
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {root} is not empty and holds no demo set made with {params}; "
                         "pass overwrite=True to replace it")
    staging = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex}"
    try:
        _build(staging, params)
        if overwrite and root.exists():
            shutil.rmtree(root)
        try:
            os.rename(staging, root)
        except OSError:
            if _existing_params(root) != params:  # not a concurrent caller that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _paths(root)


def score_answers(answers_path: str | os.PathLike, train_json: str | os.PathLike) -> dict:
    """Does a model read the image? For eval answers (``answers.jsonl``) on demo questions: exact-match
    accuracy per question kind, beside the text-only prior (the most frequent training answer to the
    same question text, what a model that ignores the image does best) and, on the contrast file,
    the pair accuracy (both images of a pair right; 0 for any model that ignores the image)."""
    from collections import Counter, defaultdict

    from vittle_fast.eval.metrics import exact_match

    prior: dict[str, Counter] = defaultdict(Counter)
    for record in json.loads(Path(train_json).read_text()):
        conversation = record["conversations"]
        for human, reply in zip(conversation[0::2], conversation[1::2]):
            prior[human["value"].replace(IMAGE_PLACEHOLDER, "").strip()][reply["value"]] += 1
    answers = [json.loads(line) for line in Path(answers_path).read_text().splitlines() if line.strip()]
    rows: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    correct = {}
    for a in answers:
        reference = a["metadata"]["reference"]
        right = exact_match(a["text"], reference)
        guess = prior[a["prompt"]].most_common(1)[0][0] if prior[a["prompt"]] else None
        rows[question_kind(a["prompt"])].append((right, guess == reference))
        correct[str(a["question_id"])] = right
    report = {kind: {"n": len(r), "accuracy": sum(x for x, _ in r) / len(r), "text_prior": sum(p for _, p in r) / len(r)}
              for kind, r in sorted(rows.items())}
    every = [x for r in rows.values() for x in r]
    report["all"] = {"n": len(every), "accuracy": sum(x for x, _ in every) / len(every),
                     "text_prior": sum(p for _, p in every) / len(every)}
    pairs = [correct[k] and correct[k[:-1] + "b"] for k in correct if k.startswith("c") and k.endswith("a")
             and k[:-1] + "b" in correct]
    if pairs:
        report["pair_accuracy"] = sum(pairs) / len(pairs)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n_train", type=int, default=1000)
    parser.add_argument("--n_val", type=int, default=200)
    parser.add_argument("--n_contrast", type=int, default=100, help="image-dependent question pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64, help="rendered image side (pixels)")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    parser.add_argument("--score", metavar="ANSWERS_JSONL", default=None,
                        help="instead: score eval answers on the set in --out (per kind, text-only prior, pairs)")
    args = parser.parse_args(argv)
    if args.score:
        print(json.dumps(score_answers(args.score, _paths(Path(args.out)).train_json), indent=1))
        return
    paths = make_demo_dataset(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed, n_contrast=args.n_contrast,
                              image_size=args.image_size, vocab_size=args.vocab_size,
                              overwrite=args.overwrite)
    for name, path in asdict(paths).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
