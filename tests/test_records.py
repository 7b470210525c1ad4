"""Streaming JSON parse and record validation (neva_core.data.records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shard_support import record

from neva_core.data import records as R
from neva_core.errors import NevaError

TRICKY = [
    {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Render a clear summary.\n<image>"}, {"from": "gpt", "value": "ok"}]},
    {"id": 7, "text": "brackets ] [ } { and \"quotes\", commas, \\ backslashes \u00e9\u4e2d\U0001f600"},
    123456789, -0.5e-3, True, False, None, "a string element", [1, [2, [3, {"deep": []}]]], {}, [],
]


def write(tmp_path: Path, text: str | bytes, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.mark.parametrize("read_chars", [1, 2, 3, 7, 64, 1 << 20])
def test_streaming_parse_matches_json_load_for_any_chunk_size(tmp_path, read_chars):
    path = write(tmp_path, json.dumps(TRICKY, ensure_ascii=False, indent=2))
    assert list(R.iter_json_list(path, read_chars)) == list(enumerate(json.loads(path.read_text())))


@pytest.mark.parametrize("read_chars", [1, 2, 3])
def test_numbers_and_literals_split_across_chunks_are_not_cut(tmp_path, read_chars):
    path = write(tmp_path, "[1,23,456,7890,true,null,-12.5e3]")
    assert [value for _, value in R.iter_json_list(path, read_chars)] == [1, 23, 456, 7890, True, None, -12.5e3]


def test_empty_list_whitespace_and_bom(tmp_path):
    assert list(R.iter_json_list(write(tmp_path, "  [ \n ]  \n"))) == []
    path = write(tmp_path, b"\xef\xbb\xbf[{\"id\": 1}]")
    assert list(R.iter_json_list(path)) == [(0, {"id": 1})]


@pytest.mark.parametrize("text, expected", [
    ('{"id": 1}', "is not a JSON list of records: it starts with '{'"),
    ("", "it starts with an empty file"),
    ('[{"id": 1}] [', "unexpected data after the closing ']'"),
    ('[{"id": 1}', "expected ',' or ']' after list element 0, found the end of the file"),
    ('[{"id": 1} {"id": 2}]', "expected ',' or ']' after list element 0, found '{'"),
])
def test_not_a_list_or_badly_delimited_is_a_clear_error(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(NevaError, match=str(path)) as error:
        list(R.iter_json_list(path))
    assert expected in str(error.value)


@pytest.mark.parametrize("read_chars", [4, 1 << 20])
def test_syntax_error_names_the_file_and_its_byte_offset(tmp_path, read_chars):
    good = [{"id": f"{i}", "caption": "caf\u00e9 \u4e2d"} for i in range(50)]  # multi-byte characters before it
    text = json.dumps(good, ensure_ascii=False)[:-1] + ', {"id": "x", "v": tru}]'
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    expected_byte = len(text[: reference.value.pos].encode())
    path = write(tmp_path, text)
    with pytest.raises(NevaError) as error:
        list(R.iter_json_list(path, read_chars))
    assert str(path) in str(error.value)
    assert f"JSON syntax error: Expecting value (at byte {expected_byte})" in str(error.value)


def test_syntax_error_far_before_the_end_is_reported_without_reading_on(tmp_path):
    text = '[{"id": 1}, {"id": 2 "x": 1}' + ', {"id": 3}' * 20000 + "]"
    path = write(tmp_path, text)
    with pytest.raises(NevaError, match=r"Expecting ',' delimiter \(at byte 21\)"):
        list(R.iter_json_list(path, 4096))


def test_unterminated_string_and_invalid_utf8_are_errors(tmp_path):
    with pytest.raises(NevaError, match="Unterminated string"):
        list(R.iter_json_list(write(tmp_path, '[{"id": "abc'), 3))
    with pytest.raises(NevaError, match="not valid UTF-8 near byte 9"):
        list(R.iter_json_list(write(tmp_path, b'[{"id": "\xff"}]')))


def test_missing_file_is_a_neva_error(tmp_path):
    with pytest.raises(NevaError, match="cannot read"):
        list(R.iter_json_list(tmp_path / "absent.json"))


def test_valid_records_with_tag_before_or_after_and_text_only():
    before = R.validate_record(0, record("1", "a/1.jpg", tag_first=True))
    after = R.validate_record(1, record(2, "./a//2.jpg", tag_first=False))
    text_only = R.validate_record(2, record("3"))
    assert isinstance(before, R.ValidRecord) and before.key == "1" and before.image == "a/1.jpg"
    assert isinstance(after, R.ValidRecord) and after.key == "2" and after.image == "a/2.jpg"
    assert isinstance(text_only, R.ValidRecord) and text_only.image is None


def multi_turn(values: list[tuple[str, str]], image: str | None = "x.jpg") -> dict:
    rec = {"id": "m", "conversations": [{"from": who, "value": text} for who, text in values]}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.mark.parametrize("obj, reason, detail", [
    ([1, 2], R.NOT_AN_OBJECT, "element is a JSON array"),
    ("text", R.NOT_AN_OBJECT, "JSON string"),
    ({"conversations": []}, R.BAD_ID, "no 'id'"),
    (record(""), R.BAD_ID, "empty string"),
    (record(True), R.BAD_ID, "got a JSON boolean"),
    (record(1.5), R.BAD_ID, "got a JSON number"),
    (record({"a": 1}), R.BAD_ID, "got a JSON object"),
    (record("x", "/abs/x.jpg"), R.BAD_IMAGE_PATH, "is absolute"),
    (record("x", "C:/x.jpg"), R.BAD_IMAGE_PATH, "is absolute"),
    (record("x", "a/../../x.jpg"), R.BAD_IMAGE_PATH, "escapes the image root"),
    (record("x", "a\\x.jpg"), R.BAD_IMAGE_PATH, "backslash"),
    (record("x", "."), R.BAD_IMAGE_PATH, "image root itself"),
    (record("x", ""), R.BAD_IMAGE_PATH, "empty string"),
    ({"id": "x", "image": None, "conversations": []}, R.BAD_IMAGE_PATH, "got a JSON null"),
    ({"id": "x", "image": ["a.jpg"], "conversations": []}, R.BAD_IMAGE_PATH, "got a JSON array"),
    ({"id": "x", "image": "a.jpg"}, R.BAD_CONVERSATIONS, "non-empty list"),
    ({"id": "x", "image": "a.jpg", "conversations": []}, R.BAD_CONVERSATIONS, "non-empty list"),
    ({"id": "x", "image": "a.jpg", "conversations": "hi"}, R.BAD_CONVERSATIONS, "non-empty list"),
    (multi_turn([("gpt", "<image> hi"), ("human", "x")]), R.BAD_CONVERSATIONS, "turn 0 is from 'gpt'"),
    (multi_turn([("human", "<image> hi"), ("human", "x")]), R.BAD_CONVERSATIONS, "turn 1 is from 'human'"),
    (multi_turn([("human", "<image> hi"), ("gpt", "a"), ("gpt", "b")]), R.BAD_CONVERSATIONS, "turn 2"),
    ({"id": "x", "conversations": [{"from": "human", "value": 3}]}, R.BAD_CONVERSATIONS, "no string 'value'"),
    ({"id": "x", "conversations": ["hi"]}, R.BAD_CONVERSATIONS, "turn 0 is a JSON string"),
    (multi_turn([("human", "hi"), ("gpt", "a")]), R.BAD_IMAGE_TAG_COUNT, "found 0 in the first turn"),
    (multi_turn([("human", "<image><image>"), ("gpt", "a")]), R.BAD_IMAGE_TAG_COUNT, "found 2 in the first"),
    (multi_turn([("human", "<image>"), ("gpt", "a <image>")]), R.BAD_IMAGE_TAG_COUNT, "1 elsewhere"),
    (multi_turn([("human", "<image> hi"), ("gpt", "a")], image=None), R.BAD_IMAGE_TAG_COUNT, "no image but 1"),
])
def test_malformed_records_are_skipped_with_a_reason(obj, reason, detail):
    verdict = R.validate_record(5, obj)
    assert isinstance(verdict, R.Skip)
    assert verdict.reason == reason
    assert detail in verdict.detail


def test_multi_turn_record_with_one_image_tag_is_valid():
    obj = multi_turn([("human", "What is it?\n<image>"), ("gpt", "a cat"), ("human", "Colour?"), ("gpt", "grey")])
    assert isinstance(R.validate_record(0, obj), R.ValidRecord)


def test_sample_keys_have_no_dots_or_slashes_and_stay_distinct():
    ids = ["a.b", "a%2Eb", "a_b", "x/y", "tab\there", "%", 42, "42x"]
    keys = [R.sample_key(i) for i in ids]
    assert keys[:2] == ["a%2Eb", "a%252Eb"]
    assert keys[3] == "x%2Fy" and keys[4] == "tab%09here" and keys[6] == "42"
    assert all("." not in key and "/" not in key for key in keys)
    assert len(set(keys)) == len(keys)


def test_skip_entry_keeps_only_usable_ids():
    skip = R.Skip(R.BAD_ID, "why")
    assert R.skip_entry(3, 7, skip) == {"index": 3, "id": 7, "reason": "bad_id", "detail": "why"}
    assert R.skip_entry(3, True, skip)["id"] is None
    assert R.skip_entry(3, {"a": 1}, skip)["id"] is None
