"""The runtime tokenizer: the folder `neva tokenizer extend` writes, read for training, generation and export.

A folder with `tokenizer.model` is read with sentencepiece (the authority for LLaMA-style models); one
with only `tokenizer.json` (Qwen2, Llama-3) with the Hugging Face `tokenizers` library. Token roles (which
token marks image patches, ...) come from `extension.json`'s "roles" when present, else NeMo's
`<extra_id_*>` roles.

`encode` tokenises a text as the start of a sequence: sentencepiece models prefix it with their dummy
space, as LLaVA's tokenizer does for every chunk it encodes. `encode_continuation` tokenises a text as it
follows other text or a token inside one sequence (no dummy space): the prompt templates use it to build
ids turn by turn that equal the whole prompt's tokenisation.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from neva_core.errors import NevaError
from neva_core.tokenizer import EXTENSION_FILE, HF_CONFIG_FILE, HF_TOKENIZER_FILE, MODEL_FILE, NEVA_TOKEN_ROLES

IMAGE_ROLE = "image_patch"
# Texts whose pieces a continuation-safe tokenizer encodes to the same ids apart as together.
_CONTINUATION_PROBES = (("USER:", " red circle"), ("a", " \nb"), ("[/INST]", " yes"))


class TextTokenizer(ABC):
    """Encode/decode text and name the ids of BOS, EOS, padding and the NeVA role tokens."""

    def __init__(self, folder: Path, roles: Mapping[str, str]) -> None:
        self.folder = folder
        self.roles = dict(roles)

    bos_id: int | None
    eos_id: int | None
    pad_id: int
    vocab_size: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of `text` at the start of a sequence; no BOS/EOS added."""

    @abstractmethod
    def encode_continuation(self, text: str) -> list[int]:
        """The ids of `text` where it follows other tokens in the same sequence (no dummy prefix space)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; BOS/EOS/padding are left out, role tokens are written out."""

    @abstractmethod
    def _lookup(self, token: str) -> int | None:
        """The id of the single token `token`, or None."""

    @property
    @abstractmethod
    def adds_prefix_space(self) -> bool:
        """True when `encode(text)` equals `encode_continuation(" " + text)` for any non-empty text
        (sentencepiece's dummy prefix)."""

    def token_id(self, token: str) -> int:
        index = self._lookup(token)
        if index is None:
            raise NevaError(
                f"the tokenizer in {self.folder} has no token {token!r}; extend it with `neva tokenizer extend`"
            )
        return index

    def role_token(self, role: str) -> str:
        if role not in self.roles:
            raise NevaError(
                f"token role {role!r} is not defined for the tokenizer in {self.folder} "
                f"(roles: {', '.join(sorted(self.roles))})"
            )
        return self.roles[role]

    def role_id(self, role: str) -> int:
        token = self.role_token(role)
        index = self._lookup(token)
        if index is None:
            raise NevaError(
                f"the tokenizer in {self.folder} has no {token!r}, the {role} token; "
                "extend it with `neva tokenizer extend` (or fix the roles in its extension.json)"
            )
        return index

    @cached_property
    def image_token_id(self) -> int:
        return self.role_id(IMAGE_ROLE)


class SentencePieceTextTokenizer(TextTokenizer):
    def __init__(self, folder: Path, roles: Mapping[str, str]) -> None:
        from sentencepiece import SentencePieceProcessor

        from neva_core.tokenizer import load_model_proto

        super().__init__(folder, roles)
        self._proto = load_model_proto(folder / MODEL_FILE)
        self._processor = SentencePieceProcessor(model_proto=self._proto.SerializeToString())
        spec = self._proto.trainer_spec
        self.bos_id = spec.bos_id if spec.bos_id >= 0 else None
        self.eos_id = spec.eos_id if spec.eos_id >= 0 else None
        # LLaMA models have no pad piece; LLaVA pads with unk. Padding is never attended nor trained.
        self.pad_id = next(i for i in (spec.pad_id, spec.unk_id, spec.eos_id, 0) if i >= 0)
        self.vocab_size = len(self._proto.pieces)
        self._ids = {piece.piece: index for index, piece in enumerate(self._proto.pieces)}

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        return self._continuation.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(list(ids))

    def _lookup(self, token: str) -> int | None:
        return self._ids.get(token)

    @property
    def adds_prefix_space(self) -> bool:
        return self._proto.normalizer_spec.add_dummy_prefix

    @cached_property
    def _continuation(self) -> Any:
        from sentencepiece import SentencePieceProcessor

        if self._proto.normalizer_spec.remove_extra_whitespaces:
            raise NevaError(
                f"{self.folder / MODEL_FILE} removes extra whitespace, so a prompt cannot be tokenised turn by "
                "turn; the prompt templates need a LLaMA-style sentencepiece model"
            )
        proto = type(self._proto)()
        proto.CopyFrom(self._proto)
        proto.normalizer_spec.add_dummy_prefix = False
        return SentencePieceProcessor(model_proto=proto.SerializeToString())


class HFTextTokenizer(TextTokenizer):
    """A `tokenizer.json` model; its special tokens come from `tokenizer_config.json`."""

    def __init__(self, folder: Path, roles: Mapping[str, str]) -> None:
        from tokenizers import Tokenizer

        super().__init__(folder, roles)
        path = folder / HF_TOKENIZER_FILE
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception that names no file
            raise NevaError(f"{path} is not a Hugging Face tokenizer file ({exc})") from exc
        config = _read_json(folder / HF_CONFIG_FILE) if (folder / HF_CONFIG_FILE).is_file() else {}
        self.bos_id = self._config_token_id(config, "bos_token")
        self.eos_id = self._config_token_id(config, "eos_token")
        pad = self._config_token_id(config, "pad_token")
        self.pad_id = next((i for i in (pad, self.eos_id) if i is not None), 0)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _config_token_id(self, config: Mapping[str, Any], key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):  # the AddedToken form {"content": ...}
            value = value.get("content")
        if value is None:
            return None
        index = self._tokenizer.token_to_id(value)
        if index is None:
            raise NevaError(f"{self.folder / HF_CONFIG_FILE} names {key} {value!r}, which {HF_TOKENIZER_FILE} lacks")
        return index

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        if self._prefixes_text:
            raise NevaError(
                f"{self.folder / HF_TOKENIZER_FILE} adds a prefix space to every text, so a prompt cannot be "
                f"tokenised turn by turn; put the model's sentencepiece {MODEL_FILE} beside it"
            )
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def _lookup(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    @property
    def adds_prefix_space(self) -> bool:
        return False

    @cached_property
    def _prefixes_text(self) -> bool:
        return any(self.encode(a + b) != self.encode(a) + self.encode(b) for a, b in _CONTINUATION_PROBES)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NevaError(f"cannot read {path}: {exc}") from exc


def read_roles(folder: Path) -> dict[str, str]:
    """The role -> token map of a tokenizer folder: extension.json's "roles", else NeMo's extra ids."""
    extension = folder / EXTENSION_FILE
    roles = _read_json(extension).get("roles") if extension.is_file() else None
    if roles is None:
        return dict(NEVA_TOKEN_ROLES)
    if not isinstance(roles, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items()):
        raise NevaError(f"{extension}: \"roles\" must map role names to token strings, got {roles!r}")
    return roles


def load_text_tokenizer(folder: Path) -> TextTokenizer:
    """The tokenizer of `folder`: sentencepiece `tokenizer.model` when present, else HF `tokenizer.json`."""
    folder = Path(folder)
    roles = read_roles(folder) if folder.is_dir() else {}
    if (folder / MODEL_FILE).is_file():
        return SentencePieceTextTokenizer(folder, roles)
    if (folder / HF_TOKENIZER_FILE).is_file():
        return HFTextTokenizer(folder, roles)
    raise NevaError(
        f"{folder} holds no tokenizer ({MODEL_FILE} or {HF_TOKENIZER_FILE}); pass the folder written by "
        "`neva tokenizer extend`"
    )
