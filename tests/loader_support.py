"""A small sample encoder for the loader tests: characters as tokens, a fixed image-token run, tiny images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from neva_core.data.loader import IGNORE_INDEX, EncodedRecord, RawRecord, SkipRecord

IMAGE_TOKEN_ID = 3
IMAGE_TOKENS = 4
IMAGE_SIZE = 8
PAD_ID = 0
SKIP_MARK = "SKIP-ME"


def char_ids(text: str) -> list[int]:
    return [10 + ord(char) % 200 for char in text]


@dataclass(frozen=True)
class CharEncoder:
    """Human turns untrained, answers trained; `<image>` becomes IMAGE_TOKENS image tokens.

    A record whose first answer contains SKIP_MARK raises SkipRecord; `skip_ids` names more of them."""

    skip_ids: frozenset[str] = frozenset()

    def __call__(self, record: RawRecord) -> EncodedRecord:
        if record.id in self.skip_ids or SKIP_MARK in record.conversations[-1]["value"]:
            raise SkipRecord("marked to be skipped")
        input_ids, labels = [1], [IGNORE_INDEX]  # BOS, untrained
        for turn in record.conversations:
            before, tag, after = turn["value"].partition("<image>")
            ids = char_ids(before) + [IMAGE_TOKEN_ID] * IMAGE_TOKENS * bool(tag) + char_ids(after)
            input_ids += ids
            labels += ids if turn["from"] == "gpt" else [IGNORE_INDEX] * len(ids)
        return EncodedRecord(input_ids=input_ids, labels=labels, image=None if record.image is None else tiny_image(record.image))


def tiny_image(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
