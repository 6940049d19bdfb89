"""No single record or data file can stop a run (issue 13 items 1 and 7).

Every way one record can fail -- structure, template, tokenizer, image -- becomes a counted skip
of a named kind (or, with ``strict``, an error naming the record); over-long records and
decompression bombs are kinds of their own; data-file errors name the file and line. The last
test fuzzes record structures and string contents (hypothesis) through dataset + collator.
"""
import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data import TWO_TURNS, build_word_tokenizer, make_dataset, png_header_only, write_png

from vittle_fast.data import SKIP_KINDS, BadRecordError, LlavaCollator, Sample, Skipped

SURROGATE_REPLY = {"id": "sur-1", "conversations": [{"from": "human", "value": "What colour?"},
                                                     {"from": "gpt", "value": "red \ud800"}]}
GOOD = {"id": "good", "conversations": TWO_TURNS[2:]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


def counts(batch):
    return dict(zip(SKIP_KINDS, batch["n_skipped"].tolist()))


def test_lone_surrogate_is_skipped_as_bad_text(tokenizer):
    """Valid JSON, but the tokenizer raises TypeError on it: skipped and counted, not fatal."""
    ds = make_dataset([SURROGATE_REPLY, GOOD], tokenizer)
    item = ds[0]
    assert isinstance(item, Skipped) and item.kind == "bad_text" and item.index == 0
    assert isinstance(ds[1], Sample)
    assert counts(LlavaCollator.from_dataset(ds)([ds[0], ds[1]]))["bad_text"] == 1


def test_strict_names_the_record_file_and_id(tokenizer, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, SURROGATE_REPLY]))
    ds = make_dataset(path, tokenizer, strict=True)
    with pytest.raises(BadRecordError) as info:
        ds[1]
    assert info.value.kind == "bad_text"
    assert "record 1 (id 'sur-1')" in str(info.value) and str(path) in str(info.value)


def test_skip_warnings_name_the_record_and_are_rate_limited(tokenizer, caplog):
    records = [{"id": f"r{i}", "conversations": []} for i in range(50)] + [SURROGATE_REPLY]
    ds = make_dataset(records, tokenizer)
    with caplog.at_level(logging.WARNING, logger="vittle_fast.data.dataset"):
        items = [ds[i] for i in range(len(ds))]
    assert all(isinstance(item, Skipped) for item in items)
    lines = [r.getMessage() for r in caplog.records]
    # One line per kind within the rate-limit interval (60 s), each naming index and id.
    assert len(lines) == 2, lines
    assert "record 0 (id 'r0')" in lines[0] and "malformed" in lines[0]
    assert "record 50 (id 'sur-1')" in lines[1] and "bad_text" in lines[1]


def test_over_long_records_follow_truncation(tokenizer):
    long = {"conversations": TWO_TURNS[2:] * 2}  # 14 tokens
    skip = make_dataset([long], tokenizer, max_length=8)
    assert isinstance(skip[0], Skipped) and skip[0].kind == "too_long"
    cut = make_dataset([long], tokenizer, max_length=8, truncation="truncate")
    sample = cut[0]
    assert isinstance(sample, Sample) and sample.truncated and len(sample.input_ids) == 8
    batch = LlavaCollator.from_dataset(cut)([sample])
    assert batch["input_ids"].shape == (1, 8) and counts(batch)["truncated"] == 1
    fits = make_dataset([long], tokenizer, max_length=14)[0]
    assert not fits.truncated
    with pytest.raises(ValueError, match="truncation"):
        make_dataset([long], tokenizer, truncation="cut")


def test_images_over_the_pixel_limit_are_refused_from_the_header(tokenizer, tmp_path):
    one_turn = TWO_TURNS[:2]
    write_png(tmp_path / "small.png", size=(40, 30))
    png_header_only(tmp_path / "bomb.png", 10_000, 10_000)  # 1e8 pixels, no data at all
    png_header_only(tmp_path / "huge.png", 40_000, 40_000)  # Pillow's own bomb error
    records = [{"image": name, "conversations": one_turn} for name in ("small.png", "bomb.png", "huge.png")]
    ds = make_dataset(records, tokenizer, image_folder=tmp_path)
    assert isinstance(ds[0], Sample)
    assert [ds[i].kind for i in (1, 2)] == ["image_too_large"] * 2
    assert "10000x10000" in ds[1].reason
    tight = make_dataset(records[:1], tokenizer, image_folder=tmp_path, max_image_pixels=1000)
    assert tight[0].kind == "image_too_large"
    with pytest.raises(ValueError, match="max_image_pixels"):
        make_dataset(records, tokenizer, max_image_pixels=0)


def test_jsonl_records_and_bad_lines(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"id": "broken", "conver\n' + json.dumps(GOOD) + "\n")
    ds = make_dataset(path, tokenizer)
    assert len(ds) == 3 and isinstance(ds[0], Sample) and isinstance(ds[2], Sample)
    assert ds[1].kind == "malformed" and "invalid JSON" in ds[1].reason
    with pytest.raises(BadRecordError, match=f"record 1 of {path}:3: invalid JSON"):
        make_dataset(path, tokenizer, strict=True)[1]


def test_data_file_errors_name_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"id": 1},\n  {"id": 2,,}\n]')
    with pytest.raises(ValueError, match=f"{path}:3:12: invalid JSON"):
        make_dataset(path, tokenizer)
    path.write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(ValueError, match=f"{path}: not UTF-8"):
        make_dataset(path, tokenizer)
    path.write_text('{"id": 1}')
    with pytest.raises(ValueError, match=f"{path} must hold a JSON list"):
        make_dataset(path, tokenizer)


# --------------------------------------------------------------------------- fuzzing

# Strings that stress each stage: surrogates and NUL (tokenizer), the placeholder (image count),
# special tokens, whitespace only, very long text (truncation).
NASTY = st.sampled_from(["\ud800", "\udfff", "\x00", "<image>", "</s>", "<s>", " ", "\n", "",
                         "word " * 30, "red", "What colour?", "\u202e", "\U0001f600"])
TEXT = st.lists(st.one_of(NASTY, st.text(max_size=8)), max_size=4).map("".join)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"]), "value": TEXT}),
    st.dictionaries(st.sampled_from(["from", "value", "x"]), SCALAR, max_size=3),
    SCALAR,
)
IMAGE = st.one_of(st.none(), st.sampled_from(["good.png", "garbage.png", "absent.png", "bomb.png", "", "."]),
                  st.lists(st.sampled_from(["good.png", "garbage.png", 3]), max_size=2), SCALAR)
RECORD = st.one_of(
    st.fixed_dictionaries({"conversations": st.lists(MESSAGE, max_size=5)},
                          optional={"id": SCALAR, "image": IMAGE}),
    st.dictionaries(st.sampled_from(["conversations", "image", "id"]), SCALAR, max_size=3),
    SCALAR,
    st.lists(SCALAR, max_size=2),
)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_images")
    write_png(folder / "good.png")
    (folder / "garbage.png").write_bytes(b"\x89PNG not really")
    png_header_only(folder / "bomb.png", 12_000, 12_000)
    return folder


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(RECORD, min_size=1, max_size=6), pack=st.booleans())
def test_fuzz_any_record_becomes_a_sample_or_a_counted_skip(records, pack, tokenizer, image_folder):
    ds = make_dataset(records, tokenizer, image_folder=image_folder, max_length=24)
    items = [ds[i] for i in range(len(ds))]  # never raises
    samples = [item for item in items if isinstance(item, Sample)]
    assert len(samples) + sum(isinstance(item, Skipped) for item in items) == len(records)
    for sample in samples:
        assert len(sample.input_ids) == len(sample.labels) <= 24
        assert (sample.labels != -100).any()
        n_image_tokens = int((sample.input_ids == ds.image_token_id).sum())
        assert n_image_tokens == ds.num_image_tokens * sample.pixel_values.shape[0]
    batch = LlavaCollator.from_dataset(ds, pack=pack)(items)
    skipped = batch["n_skipped"].sum() - batch["n_skipped"][SKIP_KINDS.index("truncated")]
    assert int(skipped) == len(records) - len(samples)
    assert batch["input_ids"].shape[0] == (min(len(samples), 1) if pack else len(samples))
    assert batch["attention_mask"].sum() == sum(len(s.input_ids) for s in samples)
    assert batch["pixel_values"].shape[0] == sum(s.pixel_values.shape[0] for s in samples)
    strict = make_dataset(records, tokenizer, image_folder=image_folder, max_length=24, strict=True)
    for i, item in enumerate(items):  # strict raises exactly where the lenient dataset skipped
        if isinstance(item, Skipped):
            with pytest.raises(BadRecordError, match=f"record {i}"):
                strict[i]
