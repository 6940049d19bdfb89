"""The perturbation suite: the paper's visual and textual shifts (§4.1 / A.3), 5 severities each,
deterministic per (seed, item).

Visual kinds follow ImageNet-C's recipes (Hendrycks & Dietterich, 2019) on numpy / Pillow / scipy:
torchvision is not used because its PyPI wheels pin a torch build and do not install beside the CPU
torch this project tests with. Spatial sizes (blur radii, displacements) are given for 224-pixel
images and scaled to the image's side, so a 64-pixel demo image sees the same relative blur. Text
kinds edit the human message only, never an ``<image>`` placeholder or a line break (and the
answer is never passed in). Every kind gets monotonically stronger with the severity.

    python -m vittle_fast.eval.perturb --in questions.jsonl --images DIR --kind gaussian_noise --severity 3 [--out DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 224  # ImageNet-C's image side, which its spatial parameters are written for


def stable_seed(seed: int, key: object) -> int:
    """A 64-bit seed from (seed, item key) that is the same on every machine and Python run."""
    digest = hashlib.sha256(f"{seed}/{json.dumps(key, sort_keys=True, default=str)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


# ------------------------------------------------------------------------------------------------
# Visual: float images in [0, 1], [H, W, 3]
# ------------------------------------------------------------------------------------------------
def _gaussian_noise(x, s, rng, side):
    return x + rng.normal(size=x.shape) * (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1]


def _shot_noise(x, s, rng, side):
    lam = (60, 25, 12, 5, 3)[s - 1]
    return rng.poisson(x * lam) / lam


def _impulse_noise(x, s, rng, side):
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[s - 1]
    u, salt = rng.random(x.shape), rng.random(x.shape) < 0.5  # nested masks: more severe keeps the milder flips
    return np.where(u < amount, salt.astype(x.dtype), x)


def _convolve(x, kernel):
    return np.stack([ndimage.convolve(x[..., c], kernel, mode="reflect") for c in range(3)], axis=-1)


def _defocus_blur(x, s, rng, side):
    radius = (3, 4, 6, 8, 10)[s - 1] * side / REFERENCE_SIDE
    r = int(np.ceil(radius)) + 1
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = np.clip(radius + 0.5 - np.sqrt(xx ** 2 + yy ** 2), 0.0, 1.0)  # soft edge: grows smoothly with radius
    disk = ndimage.gaussian_filter(disk, 0.5 * side / REFERENCE_SIDE)  # ImageNet-C's anti-aliasing
    return _convolve(x, disk / disk.sum())


def _motion_blur(x, s, rng, side):
    length = (10, 15, 20, 25, 30)[s - 1] * side / REFERENCE_SIDE
    angle = rng.uniform(-np.pi / 4, np.pi / 4)
    r = max(int(np.ceil(length)), 1)
    kernel = np.zeros((2 * r + 1, 2 * r + 1))
    for t in np.linspace(0.0, length, 8 * r + 1):  # a line from the centre, drawn bilinearly
        px, py = r + t * np.cos(angle), r + t * np.sin(angle)
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        fx, fy = px - x0, py - y0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                if 0 <= y0 + dy <= 2 * r and 0 <= x0 + dx <= 2 * r:
                    kernel[y0 + dy, x0 + dx] += wy * wx
    return _convolve(x, kernel / kernel.sum())


def _zoom_blur(x, s, rng, side):
    top = (1.11, 1.16, 1.21, 1.26, 1.31)[s - 1]
    step = (0.01, 0.01, 0.02, 0.02, 0.03)[s - 1]
    out = x.copy()
    zooms = np.arange(1.0 + step, top, step)
    h, w = x.shape[:2]
    for z in zooms:
        zh, zw = int(np.ceil(h * z)), int(np.ceil(w * z))
        big = np.stack([ndimage.zoom(x[..., c], (zh / h, zw / w), order=1) for c in range(3)], axis=-1)
        top_y, top_x = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
        out += big[top_y:top_y + h, top_x:top_x + w]
    return out / (len(zooms) + 1)


def _hsv(x, channel, fn):
    hsv = np.asarray(Image.fromarray(_to_uint8(x)).convert("HSV"), dtype=np.float64) / 255.0
    hsv[..., channel] = np.clip(fn(hsv[..., channel]), 0, 1)
    return np.asarray(Image.fromarray(_to_uint8(hsv), "HSV").convert("RGB"), dtype=np.float64) / 255.0


def _brightness(x, s, rng, side):
    return _hsv(x, 2, lambda v: v + (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1])


def _contrast(x, s, rng, side):
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * c + mean


def _saturation(x, s, rng, side):
    return _hsv(x, 1, lambda sat: sat * (0.6, 0.4, 0.25, 0.1, 0.0)[s - 1])


def _jpeg(x, s, rng, side):
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buffer, "JPEG", quality=(25, 18, 15, 10, 7)[s - 1])
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float64) / 255.0


def _pixelate(x, s, rng, side):
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[s - 1]
    image = Image.fromarray(_to_uint8(x))
    w, h = image.size
    small = image.resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST), dtype=np.float64) / 255.0


def _elastic(x, s, rng, side):
    """A smooth random displacement field (Gaussian-filtered noise), its largest displacement
    ``amplitude`` pixels, applied with bilinear resampling."""
    h, w = x.shape[:2]
    amplitude = (4.0, 7.0, 10.0, 14.0, 20.0)[s - 1] * side / REFERENCE_SIDE
    sigma = 12.0 * side / REFERENCE_SIDE
    fields = []
    for _ in range(2):
        field = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect")
        fields.append(field / max(np.abs(field).max(), 1e-12) * amplitude)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = [yy + fields[0], xx + fields[1]]
    return np.stack([ndimage.map_coordinates(x[..., c], coords, order=1, mode="reflect") for c in range(3)], axis=-1)


VISUAL = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "motion_blur": _motion_blur, "zoom_blur": _zoom_blur,
    "brightness": _brightness, "contrast": _contrast, "saturation": _saturation, "jpeg": _jpeg,
    "pixelate": _pixelate, "elastic": _elastic,
}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def perturb_image(image: Image.Image, kind: str, severity: int, *, seed: int = 0, key: object = 0) -> Image.Image:
    """``image`` (RGB) under visual shift ``kind`` at ``severity`` 1-5; the same (seed, key) gives the
    same pixels."""
    _check(kind, severity, VISUAL)
    x = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    rng = np.random.default_rng(stable_seed(seed, key))
    return Image.fromarray(_to_uint8(VISUAL[kind](x, severity, rng, min(x.shape[:2]))))


# ------------------------------------------------------------------------------------------------
# Text: edits of the words of a human message, protected pieces untouched
# ------------------------------------------------------------------------------------------------
PROTECTED = re.compile(r"(<image>|\n)")
_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_PUNCTUATION = ".,;:!?-"


def _keyboard_neighbours() -> dict[str, str]:
    neighbours = {}
    for r, row in enumerate(_KEYBOARD_ROWS):
        for c, ch in enumerate(row):
            near = [row[j] for j in (c - 1, c + 1) if 0 <= j < len(row)]
            for other in (r - 1, r + 1):
                if 0 <= other < len(_KEYBOARD_ROWS):
                    near += [_KEYBOARD_ROWS[other][j] for j in (c - 1, c, c + 1) if 0 <= j < len(_KEYBOARD_ROWS[other])]
            neighbours[ch] = "".join(near)
    return neighbours


KEYBOARD = _keyboard_neighbours()


def _letter_positions(words):
    return [(i, j) for i, w in enumerate(words) for j, ch in enumerate(w) if ch.isalpha()]


def _edit_letter(words, rng, fn):
    positions = _letter_positions(words)
    if not positions:
        return words
    i, j = rng.choice(positions)
    words = list(words)
    words[i] = fn(words[i], j)
    return words


def _char_typo(words, rng):
    def edit(w, j):
        op = rng.choice(("insert", "delete", "substitute", "swap"))
        letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
        if op == "insert":
            return w[:j] + letter + w[j:]
        if op == "delete" and len(w) > 1:
            return w[:j] + w[j + 1:]
        if op == "swap" and j + 1 < len(w):
            return w[:j] + w[j + 1] + w[j] + w[j + 2:]
        return w[:j] + letter + w[j + 1:]
    return _edit_letter(words, rng, edit)


def _keyboard_typo(words, rng):
    def edit(w, j):
        near = KEYBOARD.get(w[j].lower())
        if not near:
            return w
        typed = rng.choice(near)
        return w[:j] + (typed.upper() if w[j].isupper() else typed) + w[j + 1:]
    return _edit_letter(words, rng, edit)


def _case(words, rng):
    return _edit_letter(words, rng, lambda w, j: w[:j] + w[j].swapcase() + w[j + 1:])


def _word_drop(words, rng):
    if len(words) < 2:
        return words
    i = rng.randrange(len(words))
    return words[:i] + words[i + 1:]


def _word_repeat(words, rng):
    i = rng.randrange(len(words))
    return words[:i + 1] + words[i:]


def _word_swap(words, rng):
    if len(words) < 2:
        return words
    i = rng.randrange(len(words) - 1)
    return words[:i] + [words[i + 1], words[i]] + words[i + 2:]


def _punctuation(words, rng):
    i = rng.randrange(len(words))
    mark = rng.choice(_PUNCTUATION)
    words = list(words)
    if words[i] and words[i][-1] in _PUNCTUATION and rng.random() < 0.5:
        words[i] = words[i][:-1]  # drop an existing mark
    else:
        words[i] = words[i] + mark
    return words


def _reorder(words, rng):
    """Move a block of one or two words elsewhere (topicalisation-like, no new words)."""
    if len(words) < 2:
        return words
    size = min(rng.choice((1, 2)), len(words) - 1)
    start = rng.randrange(len(words) - size + 1)
    block, rest = words[start:start + size], words[:start] + words[start + size:]
    at = rng.randrange(len(rest) + 1)
    return rest[:at] + block + rest[at:]


TEXT = {
    "char_typo": _char_typo, "keyboard_typo": _keyboard_typo, "word_drop": _word_drop,
    "word_repeat": _word_repeat, "word_swap": _word_swap, "case": _case, "punctuation": _punctuation,
    "reorder": _reorder,
}
_CHAR_LEVEL = {"char_typo", "keyboard_typo", "case"}
# Fraction of the units (letters or words) edited per severity; at least ``severity`` edits.
TEXT_RATES = (0.05, 0.1, 0.2, 0.3, 0.45)


def text_edit_count(kind: str, severity: int, units: int) -> int:
    return min(max(severity, round(TEXT_RATES[severity - 1] * units)), max(units, 1)) if units else 0


def perturb_text(text: str, kind: str, severity: int, *, seed: int = 0, key: object = 0) -> str:
    """``text`` under textual shift ``kind`` at ``severity`` 1-5: ``text_edit_count`` single edits,
    each in a piece between ``<image>`` placeholders / line breaks chosen in proportion to its size."""
    _check(kind, severity, TEXT)
    rng = random.Random(stable_seed(seed, key))
    pieces = PROTECTED.split(text)
    editable = [i for i, piece in enumerate(pieces) if not PROTECTED.fullmatch(piece) and piece.strip()]
    if not editable:
        return text
    words = {i: pieces[i].split(" ") for i in editable}

    def units(ws):
        return len(_letter_positions(ws)) if kind in _CHAR_LEVEL else sum(1 for w in ws if w)

    for _ in range(text_edit_count(kind, severity, sum(units(words[i]) for i in editable))):
        weights = [units(words[i]) for i in editable]
        if not any(weights):
            break
        i = rng.choices(editable, weights=weights)[0]
        words[i] = TEXT[kind](words[i], rng)
    for i in editable:
        pieces[i] = " ".join(words[i])
    return "".join(pieces)


# ------------------------------------------------------------------------------------------------
def _check(kind, severity, table):
    if kind not in table:
        raise ValueError(f"kind must be one of {sorted(table)}, got {kind!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")


KINDS = {**{k: "visual" for k in VISUAL}, **{k: "text" for k in TEXT}}


@dataclass(frozen=True)
class Perturbation:
    kind: str
    severity: int

    def __post_init__(self):
        _check(self.kind, self.severity, KINDS)

    @classmethod
    def parse(cls, spec: str) -> "Perturbation":
        """``"KIND:SEVERITY"``, e.g. ``"gaussian_noise:3"``."""
        kind, sep, severity = spec.partition(":")
        if not sep or not severity.isdigit():
            raise ValueError(f"perturbation must be KIND:SEVERITY (e.g. gaussian_noise:3), got {spec!r}")
        return cls(kind, int(severity))

    @property
    def is_text(self) -> bool:
        return KINDS[self.kind] == "text"

    def __str__(self) -> str:
        return f"{self.kind}:{self.severity}"


def write_perturbed(questions_path, images_dir, kind: str, severity: int, out_dir, seed: int = 0) -> Path:
    """Perturbed copies of a question JSONL (and, for visual kinds, of its images as PNG, the question's
    ``image`` renamed to match) in ``out_dir``; returns the new question file."""
    p = Perturbation(kind, severity)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for line in Path(questions_path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if p.is_text:
            item["text"] = perturb_text(item["text"], kind, severity, seed=seed, key=item["question_id"])
        elif item.get("image") is not None:
            with Image.open(Path(images_dir) / item["image"]) as image:
                shifted = perturb_image(image, kind, severity, seed=seed, key=item["question_id"])
            item["image"] = str(Path(item["image"]).with_suffix(".png"))
            (out / "images" / item["image"]).parent.mkdir(parents=True, exist_ok=True)
            shifted.save(out / "images" / item["image"])
        lines.append(json.dumps(item))
    target = out / "questions.jsonl"
    target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write perturbed copies of a LLaVA question file and its images.")
    parser.add_argument("--in", dest="questions", required=True, help="question JSONL (question_id, image, text)")
    parser.add_argument("--images", required=True, help="image folder of the questions")
    parser.add_argument("--kind", required=True, choices=sorted(KINDS))
    parser.add_argument("--severity", required=True, type=int, choices=SEVERITIES)
    parser.add_argument("--out", default=None, help="output folder (default: perturbed/KIND_SEVERITY next to --in)")
    parser.add_argument("--seed", type=int, default=0, help="the same (seed, question id) gives the same perturbation")
    args = parser.parse_args(argv)
    out = args.out or Path(args.questions).parent / "perturbed" / f"{args.kind}_{args.severity}"
    target = write_perturbed(args.questions, args.images, args.kind, args.severity, out, args.seed)
    print(f"questions: {target}\nimages: {Path(out) / 'images'}")


if __name__ == "__main__":
    main()
