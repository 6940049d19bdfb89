"""The perturbation suite: deterministic per (seed, item), stronger with every severity (PSNR),
text edits never touching <image> or line breaks, the perturb CLI."""
import json
import random

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vittle_fast.data.demo import random_scene, render_scene
from vittle_fast.eval.perturb import TEXT, VISUAL, Perturbation, main, perturb_image, perturb_text


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(im, dtype=np.float64) for im in (a, b))
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def images():
    """Demo scenes at 64 px plus a 96 px image of smoothed noise (texture at every scale, a natural-image stand-in)."""
    rng = random.Random(3)
    scenes = [render_scene(random_scene(rng), 64, rng) for _ in range(3)]
    noise = ndimage.gaussian_filter(np.random.default_rng(0).random((96, 96, 3)), (1.5, 1.5, 0))
    texture = (noise - noise.min()) / (noise.max() - noise.min()) * 255
    return scenes + [Image.fromarray(texture.astype(np.uint8))]


@pytest.mark.parametrize("kind", sorted(VISUAL))
def test_visual_psnr_falls_with_severity_and_is_deterministic(kind, images):
    """Mean PSNR over the images falls strictly with every severity step. Single images may tie
    (brightness clipping a white background at 4 and 5) or, for pixelate, move by a fraction of a dB
    where a block grid happens to align with the shapes' edges."""
    table = []
    for key, image in enumerate(images):
        shifted = [perturb_image(image, kind, s, seed=7, key=key) for s in range(1, 6)]
        table.append([psnr(image, out) for out in shifted])
        assert all(out.size == image.size and out.mode == "RGB" for out in shifted)
        assert table[-1][0] < 60, f"{kind}: severity 1 leaves image {key} (nearly) unchanged: {table[-1]}"
        again = perturb_image(image, kind, 3, seed=7, key=key)
        assert np.array_equal(np.asarray(again), np.asarray(shifted[2]))
    mean = np.mean(table, axis=0)
    assert all(a > b for a, b in zip(mean, mean[1:])), f"{kind}: mean PSNR {mean}, per image {table}"
    assert all(a > b for a, b in zip(table[-1], table[-1][1:])), f"{kind} on the textured image: {table[-1]}"


@pytest.mark.parametrize("kind", ["gaussian_noise", "impulse_noise", "elastic", "motion_blur"])
def test_random_visual_kinds_depend_on_seed_and_item(kind, images):
    image = images[0]
    base = np.asarray(perturb_image(image, kind, 3, seed=0, key="q1"))
    assert not np.array_equal(base, np.asarray(perturb_image(image, kind, 3, seed=1, key="q1")))
    assert not np.array_equal(base, np.asarray(perturb_image(image, kind, 3, seed=0, key="q2")))


QUESTIONS = ["<image>\nWhat colour is the circle?",
             "Is there a red square in the image?\n<image>\nAnswer the question using a single word or phrase.",
             "What is 2 plus 3?"]


@pytest.mark.parametrize("kind", sorted(TEXT))
def test_text_kinds_keep_image_placeholders_and_line_breaks(kind):
    for key, text in enumerate(QUESTIONS):
        previous = text
        for severity in range(1, 6):
            out = perturb_text(text, kind, severity, seed=5, key=key)
            assert out == perturb_text(text, kind, severity, seed=5, key=key)
            # the protected skeleton (placeholders and line breaks, in order) is untouched
            skeleton = [piece for piece in out.replace("<image>", "\0<image>\0").replace("\n", "\0\n\0").split("\0")
                        if piece in ("<image>", "\n")]
            expected = [piece for piece in text.replace("<image>", "\0<image>\0").replace("\n", "\0\n\0").split("\0")
                        if piece in ("<image>", "\n")]
            assert skeleton == expected, (kind, severity, out)
            assert out.count("<image>") == text.count("<image>")
            if severity == 5:
                assert out != text, (kind, out)
            previous = out
        assert previous


def test_text_severity_edits_more():
    text = "Is there a red square in the image? Answer the question using a single word or phrase."
    changed = []
    for severity in range(1, 6):
        out = perturb_text(text, "char_typo", severity, seed=0, key="x")
        changed.append(sum(a != b for a, b in zip(out, text)) + abs(len(out) - len(text)))
    assert changed[0] >= 1 and changed[-1] > changed[0]


def test_perturbation_spec_parsing():
    assert Perturbation.parse("gaussian_noise:3") == Perturbation("gaussian_noise", 3)
    assert Perturbation.parse("word_swap:1").is_text and not Perturbation.parse("jpeg:5").is_text
    for bad in ("gaussian_noise", "gaussian_noise:6", "fog:2", "jpeg:x"):
        with pytest.raises(ValueError):
            Perturbation.parse(bad)


def test_perturb_cli_writes_copies(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    rng = random.Random(0)
    render_scene(random_scene(rng), 64, rng).save(image_dir / "a.jpg")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "What colour is the circle?"}) + "\n")
    main(["--in", str(questions), "--images", str(image_dir), "--kind", "pixelate", "--severity", "4",
          "--out", str(tmp_path / "out")])
    item = json.loads((tmp_path / "out" / "questions.jsonl").read_text())
    assert item["image"] == "a.png" and item["text"] == "What colour is the circle?"
    with Image.open(image_dir / "a.jpg") as original:
        expected = perturb_image(original, "pixelate", 4, key=1)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "images" / "a.png")), np.asarray(expected))
    main(["--in", str(questions), "--images", str(image_dir), "--kind", "word_swap", "--severity", "2",
          "--out", str(tmp_path / "text")])
    item = json.loads((tmp_path / "text" / "questions.jsonl").read_text())
    assert item["text"] == perturb_text("What colour is the circle?", "word_swap", 2, key=1)
