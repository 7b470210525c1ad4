"""LLaVA-style conversation records: streaming parse of the JSON list and per-record validation.

The annotation files are one JSON list (LCS-558K: 181 MB, 558K records), so the list is decoded one
element at a time from a sliding text buffer and never held whole. A file that is not a JSON list,
or that has a syntax error, is a `NevaError` naming the file and the byte offset. A single element
that is not a usable record is *skipped* with one of the reasons below, never fatal.

Skip reasons decided here (structure of the record itself):

- ``not_an_object``: the list element is not a JSON object.
- ``bad_id``: ``id`` missing, empty, or not a string/integer.
- ``bad_image_path``: ``image`` present but not a relative path inside the image root
  (absolute, ``..``, backslashes, a list of images, null).
- ``bad_conversations``: ``conversations`` missing or empty, a turn that is not an object with string
  ``from``/``value``, or roles that do not alternate human/gpt starting with human.
- ``bad_image_tag_count``: a record with an image needs exactly one ``<image>`` tag, in its first
  human turn (before or after the instruction); a record without an image needs none.
- ``duplicate_id``: a later record whose sample key was already used (energon refuses duplicate keys);
  decided by the shard planner, which sees every record in order.

Reasons decided per image (see `neva_core.data.images`): ``missing_image``, ``unreadable_image``,
``empty_image``, ``corrupt_image``.

Sample keys: ``str(id)`` with ``%``, ``.``, ``/``, ``\\`` and control characters percent-encoded
(``a.b`` -> ``a%2Eb``). Webdataset splits member names at the first dot and treats ``/`` as a folder,
so those characters cannot stay; the encoding is injective, so two distinct ids never collide, and the
original id stays untouched in the sample's ``json`` member.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from neva_core.errors import NevaError

NOT_AN_OBJECT = "not_an_object"
BAD_ID = "bad_id"
BAD_IMAGE_PATH = "bad_image_path"
BAD_CONVERSATIONS = "bad_conversations"
BAD_IMAGE_TAG_COUNT = "bad_image_tag_count"
DUPLICATE_ID = "duplicate_id"

IMAGE_TAG = "<image>"
HUMAN, GPT = "human", "gpt"

_READ_CHARS = 1 << 20
# A decode error this far before the end of the buffered text cannot be caused by the buffer ending
# early: the decoder only looks a few characters past the failing position.
_ERROR_MARGIN = 1024
_WHITESPACE = " \t\n\r"
_DELIMITER = re.compile(r"[ \t\n\r,\]]")
_KEY_ESCAPES = {c: f"%{ord(c):02X}" for c in "%./\\"} | {chr(i): f"%{i:02X}" for i in (*range(32), 127)}
_KEY_TABLE = str.maketrans(_KEY_ESCAPES)


@dataclass(frozen=True, slots=True)
class Skip:
    """Why one record is not written: `reason` is a stable code, `detail` says what exactly is wrong."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class ValidRecord:
    index: int  # position in the input list
    key: str  # webdataset sample key
    image: str | None  # normalised relative image path; None for text-only records
    record: dict[str, Any]


def skip_entry(index: int, record_id: Any, skip: Skip) -> dict[str, Any]:
    """One line of skipped.jsonl."""
    shown_id = record_id if isinstance(record_id, (str, int)) and not isinstance(record_id, bool) else None
    return {"index": index, "id": shown_id, "reason": skip.reason, "detail": skip.detail}


def sample_key(record_id: str | int) -> str:
    return str(record_id).translate(_KEY_TABLE)


def validate_record(index: int, obj: Any) -> ValidRecord | Skip:
    """Check one list element's structure; duplicates are the caller's concern (it sees all keys)."""
    if not isinstance(obj, dict):
        return Skip(NOT_AN_OBJECT, f"element is a JSON {_json_type(obj)}, expected an object")
    key = _check_id(obj)
    if isinstance(key, Skip):
        return key
    image = _check_image_path(obj)
    if isinstance(image, Skip):
        return image
    problem = _check_conversations(obj.get("conversations"), has_image=image is not None)
    if problem is not None:
        return problem
    return ValidRecord(index=index, key=key, image=image, record=obj)


def normalise_image_path(value: Any) -> str | Skip:
    """A record's `image` as a clean relative POSIX path, or why it cannot be used.

    Only lexical checks: a symlink inside the image folder is the owner's choice and is followed.
    String operations rather than PurePosixPath: this runs once per record (558K times for LCS-558K).
    """
    if not isinstance(value, str):
        return Skip(BAD_IMAGE_PATH, f"image must be a relative path string, got a JSON {_json_type(value)}")
    if not value.strip():
        return Skip(BAD_IMAGE_PATH, "image is an empty string")
    if "\\" in value or "\0" in value:
        return Skip(BAD_IMAGE_PATH, f"image {value!r} contains a backslash or NUL; use '/' separators")
    if value.startswith("/") or value[1:2] == ":":
        return Skip(BAD_IMAGE_PATH, f"image {value!r} is absolute; it must be relative to the image root")
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if ".." in parts:
        return Skip(BAD_IMAGE_PATH, f"image {value!r} escapes the image root with '..'")
    if not parts:
        return Skip(BAD_IMAGE_PATH, f"image {value!r} names the image root itself, not a file")
    return "/".join(parts)


def _check_id(obj: dict[str, Any]) -> str | Skip:
    if "id" not in obj:
        return Skip(BAD_ID, "record has no 'id'")
    record_id = obj["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        return Skip(BAD_ID, f"id must be a string or an integer, got a JSON {_json_type(record_id)}")
    if record_id == "":
        return Skip(BAD_ID, "id is an empty string")
    return sample_key(record_id)


def _check_image_path(obj: dict[str, Any]) -> str | None | Skip:
    if "image" not in obj:
        return None  # text-only sample (e.g. the ShareGPT part of mix665k)
    return normalise_image_path(obj["image"])


def _check_conversations(turns: Any, *, has_image: bool) -> Skip | None:
    if not isinstance(turns, list) or not turns:
        return Skip(BAD_CONVERSATIONS, "conversations must be a non-empty list")
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return Skip(BAD_CONVERSATIONS, f"turn {position} is a JSON {_json_type(turn)}, expected an object")
        expected = HUMAN if position % 2 == 0 else GPT
        if turn.get("from") != expected:
            return Skip(
                BAD_CONVERSATIONS,
                f"turn {position} is from {turn.get('from')!r}, expected {expected!r} "
                "(turns alternate human/gpt, starting with human)",
            )
        if not isinstance(turn.get("value"), str):
            return Skip(BAD_CONVERSATIONS, f"turn {position} has no string 'value'")
    return _check_image_tags(turns, has_image=has_image)


def _check_image_tags(turns: list[dict[str, Any]], *, has_image: bool) -> Skip | None:
    counts = [turn["value"].count(IMAGE_TAG) for turn in turns]
    if not has_image:
        if sum(counts):
            return Skip(BAD_IMAGE_TAG_COUNT, f"record has no image but {sum(counts)} {IMAGE_TAG} tag(s)")
        return None
    if counts[0] != 1 or sum(counts) != 1:
        return Skip(
            BAD_IMAGE_TAG_COUNT,
            f"record has an image, so its first human turn needs exactly one {IMAGE_TAG} tag and no other "
            f"turn any; found {counts[0]} in the first turn and {sum(counts) - counts[0]} elsewhere",
        )
    return None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def iter_json_list(path: Path, read_chars: int = _READ_CHARS) -> Iterator[tuple[int, Any]]:
    """Yield (index, element) for each element of the JSON list in `path`, reading it in chunks."""
    try:
        with open(path, "rb") as file:
            yield from _JsonListReader(file, path, read_chars).elements()
    except OSError as exc:
        raise NevaError(f"cannot read {path}: {exc.strerror or exc}") from exc


class _JsonListReader:
    """A sliding-buffer decoder: holds one chunk plus the element being decoded, never the whole list."""

    def __init__(self, file: BinaryIO, path: Path, read_chars: int) -> None:
        self.file = file
        self.path = path
        self.read_chars = read_chars
        self.text = codecs.getincrementaldecoder("utf-8-sig")()
        self.decoder = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.dropped_bytes = 0  # utf-8 length of text already discarded from the buffer (BOM included)
        self.bytes_read = 0
        self.eof = False

    def elements(self) -> Iterator[tuple[int, Any]]:
        first = self._next_char()
        if first != "[":
            found = "an empty file" if first is None else f"{first!r}"
            raise self._error(f"is not a JSON list of records: it starts with {found}, expected '['")
        self.pos += 1
        if self._next_char() == "]":
            self.pos += 1
            return self._expect_end()
        index = 0
        while True:
            yield index, self._value()
            index += 1
            separator = self._next_char()
            if separator == "]":
                self.pos += 1
                return self._expect_end()
            if separator != ",":
                found = "the end of the file" if separator is None else repr(separator)
                raise self._error(f"expected ',' or ']' after list element {index - 1}, found {found}")
            self.pos += 1

    def _value(self) -> Any:
        self._next_char()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.eof or not self._may_need_more(exc):
                    raise self._error(f"has a JSON syntax error: {exc.msg}", exc.pos) from None
                self._fill()
                continue
            # A number cut by the chunk's end parses as a shorter number ("-12." gives -12): only trust a
            # scalar once a delimiter follows it in the buffer.
            if not self.eof and not isinstance(value, (dict, list, str)) and not _DELIMITER.search(self.buf, end):
                self._fill()
                continue
            self.pos = end
            return value

    def _may_need_more(self, exc: json.JSONDecodeError) -> bool:
        # An unterminated string reports where the string starts, which can be far from the end.
        return exc.msg.startswith("Unterminated string") or exc.pos + _ERROR_MARGIN >= len(self.buf)

    def _expect_end(self) -> None:
        trailing = self._next_char()
        if trailing is not None:
            raise self._error(f"has unexpected data after the closing ']': {trailing!r}")

    def _next_char(self) -> str | None:
        """Skip whitespace (reading more as needed); return the next character, None at end of file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return None
            self._fill()

    def _fill(self) -> None:
        """Drop consumed text and append the next chunk."""
        self.dropped_bytes += len(self.buf[: self.pos].encode("utf-8", "surrogatepass"))
        raw = self.file.read(self.read_chars)
        if self.bytes_read == 0 and raw.startswith(codecs.BOM_UTF8):
            self.dropped_bytes += len(codecs.BOM_UTF8)  # the decoder drops it; byte offsets still count it
        try:
            chunk = self.text.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            raise NevaError(
                f"{self.path} is not valid UTF-8 near byte {self.bytes_read + exc.start} ({exc.reason}); "
                "JSON files must be UTF-8"
            ) from None
        self.bytes_read += len(raw)
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        self.eof = not raw

    def _error(self, what: str, pos: int | None = None) -> NevaError:
        pos = self.pos if pos is None else pos
        offset = self.dropped_bytes + len(self.buf[:pos].encode("utf-8", "surrogatepass"))
        return NevaError(
            f"{self.path} {what} (at byte {offset}). Fix or re-download the file; it must be one JSON list "
            "of records like LLaVA's blip_laion_cc_sbu_558k.json."
        )
