"""A small sample encoder for the loader tests: characters as tokens, a fixed image-token run, tiny images."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from neva_core.data.loader import EncodedRecord, RawRecord, SkipRecord
from neva_core.data.templates import IGNORE_INDEX

IMAGE_TOKEN_ID = 3
IMAGE_TOKENS = 4
IMAGE_SIZE = 8
PAD_ID = 0


def char_ids(text: str) -> list[int]:
    return [10 + ord(char) % 200 for char in text]


@dataclass(frozen=True)
class CharEncoder:
    """Human turns untrained, answers trained; `<image>` becomes IMAGE_TOKENS image tokens.

    A record named in `skip_ids` raises SkipRecord."""

    skip_ids: frozenset[str] = frozenset()
    call_log: str | None = None  # a file that gets "<pid> <id>" per call (calls happen in worker processes)
    augment: bool = False  # append a random trained token, as a random augmentation would change a sample

    def __call__(self, record: RawRecord) -> EncodedRecord:
        if self.call_log is not None:
            with open(self.call_log, "a") as log:
                log.write(f"{os.getpid()} {record.id}\n")
        if record.id in self.skip_ids:
            raise SkipRecord("marked to be skipped")
        input_ids, labels = [1], [IGNORE_INDEX]  # BOS, untrained
        for turn in record.conversations:
            before, tag, after = turn["value"].partition("<image>")
            ids = char_ids(before) + [IMAGE_TOKEN_ID] * IMAGE_TOKENS * bool(tag) + char_ids(after)
            input_ids += ids
            labels += ids if turn["from"] == "gpt" else [IGNORE_INDEX] * len(ids)
        if self.augment:
            token = int(torch.randint(10, 210, ()))
            input_ids.append(token)
            labels.append(token)
        image = None if record.image is None else tiny_image(record.image)
        return EncodedRecord(input_ids=input_ids, labels=labels, image=image)


def tiny_image(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
