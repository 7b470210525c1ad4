"""Extend a Hugging Face fast tokenizer (`tokenizer.json`, no sentencepiece file: Qwen2, Llama-3) for NeVA.

The requested tokens are added with `tokenizers`' `add_special_tokens`, so their ids follow the last id the
tokenizer has (Qwen2: after its `<|im_end|>`), and they are matched wherever they appear in text, like the
USER_DEFINED pieces of the sentencepiece kind. Existing ids never move.

NeVA's roles map to tokens the model already has where it has them, as NeMo's NeVA does for Llama-3:
`<|reserved_special_token_N|>` stands in for `<extra_id_N>` (3/4/5: image patch/start/end), so a Llama-3
vocabulary does not grow. A model with Qwen2-VL's vision tokens uses them for the image roles. Every other
requested token is added. `extension.json` records the result under "roles".

The written `tokenizer.json` and `tokenizer_config.json` are loaded back with `transformers` before the
folder is committed: every role and added token has its id, and texts encode to the source tokenizer's ids
with each new token's id spliced in where it appears.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from neva_core.errors import NevaError
from neva_core.io import atomic_file, commit_output, file_entry, write_json_atomic, write_manifest
from neva_core.tokenizer import (
    EXTENSION_FILE,
    HF_CONFIG_FILE,
    HF_FAST,
    HF_TOKENIZER_FILE,
    NEVA_SPECIAL_TOKENS,
    NEVA_TOKEN_ROLES,
    STAGE,
    TokenizerExtension,
    _extension_from_record,
    _reuse_existing,
    agreement_probes,
    validate_tokens,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Files beside tokenizer.json that transformers reads; copied as they are when present.
COMPANION_FILES = ("special_tokens_map.json", "chat_template.jinja")

# Tokens a model family already has for NeVA's roles, tried in order; a set is used only when the
# tokenizer has every token in it.
ROLE_STAND_INS: tuple[tuple[str, Mapping[str, str]], ...] = (
    ("Llama-3 reserved special tokens", MappingProxyType({
        role: f"<|reserved_special_token_{NEVA_SPECIAL_TOKENS.index(token)}|>"
        for role, token in NEVA_TOKEN_ROLES.items()
    })),
    ("Qwen2-VL vision tokens", MappingProxyType({
        "image_patch": "<|image_pad|>", "image_start": "<|vision_start|>", "image_end": "<|vision_end|>",
    })),
)

# Without a tokenizer_config.json, the generic fast class reads tokenizer.json as it is.
_GENERIC_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}


def extend_fast_tokenizer(
    tokenizer_json: Path, out_dir: Path, tokens: Sequence[str] = NEVA_SPECIAL_TOKENS,
    piece_type: str = "user_defined",
) -> TokenizerExtension:
    """Write `out_dir` with the extended tokenizer.json, its tokenizer_config.json and extension.json."""
    if piece_type != "user_defined":
        raise NevaError(
            f"piece type {piece_type!r} applies to sentencepiece models only; {tokenizer_json} is a Hugging Face "
            "tokenizer.json, whose new tokens are special tokens matched in text (drop --control)"
        )
    validate_tokens(tokens)
    sources = _read_sources(tokenizer_json)
    source_sha256 = hashlib.sha256(
        json.dumps({name: hashlib.sha256(data).hexdigest() for name, data in sources.items()}, sort_keys=True).encode()
    ).hexdigest()
    request = {"kind": HF_FAST, "tokens": list(tokens)}
    return commit_output(out_dir, reuse=lambda found: _reuse_existing(found, source_sha256, request),
                         build=lambda tmp: _write_extension(tokenizer_json, sources, source_sha256, request, tmp, out_dir))


def _write_extension(tokenizer_json: Path, sources: dict[str, bytes], source_sha256: str, request: dict[str, Any],
                     tmp: Path, out_dir: Path) -> TokenizerExtension:
    tokens = request["tokens"]
    base = load_fast_tokenizer(sources[HF_TOKENIZER_FILE], tokenizer_json)
    old_vocab_size = id_count(base)
    stand_ins, family = role_stand_ins(base, tokens)
    replaced = {NEVA_TOKEN_ROLES[role] for role in stand_ins}
    extended = load_fast_tokenizer(sources[HF_TOKENIZER_FILE], tokenizer_json)
    added, present = add_special_tokens(extended, [t for t in tokens if t not in replaced], tokenizer_json)
    present |= {token: extended.token_to_id(token) for token in stand_ins.values()}
    roles = {role: stand_ins.get(role, token) for role, token in NEVA_TOKEN_ROLES.items()
             if role in stand_ins or token in added or token in present}
    record = {
        "request": request,
        "source": {"sha256": source_sha256, "vocab_size": old_vocab_size, "file": tokenizer_json.name},
        "kind": HF_FAST,
        "added": added,
        "already_present": present,
        "vocab_size": id_count(extended),
        "roles": roles,
        "role_tokens_from": family,
    }
    files = _output_files(sources, extended, added)
    for name, data in files.items():
        with atomic_file(tmp / name) as f:
            f.write(data)
    check_fast_agreement(tmp, base, record)
    write_json_atomic(tmp / EXTENSION_FILE, record)
    names = sorted([*files, EXTENSION_FILE])
    write_manifest(tmp, {"stage": STAGE, "files": {name: file_entry(tmp / name) for name in names}})
    return _extension_from_record(out_dir, record)


def _read_sources(tokenizer_json: Path) -> dict[str, bytes]:
    """tokenizer.json and the companion files beside it that exist, by output name."""
    try:
        sources = {HF_TOKENIZER_FILE: tokenizer_json.read_bytes()}
    except FileNotFoundError as exc:
        raise NevaError(f"the tokenizer {tokenizer_json} does not exist; "
                        "pass a tokenizer.json or a model folder") from exc
    for name in (HF_CONFIG_FILE, *COMPANION_FILES):
        path = tokenizer_json.parent / name
        if path.is_file():
            sources[name] = path.read_bytes()
    return sources


def load_fast_tokenizer(data: bytes, path: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception naming no file
        raise NevaError(f"{path} is not a Hugging Face tokenizer.json ({exc}); "
                        "pass the model's tokenizer.json") from exc


def id_count(tokenizer: Tokenizer) -> int:
    """One more than the highest id, over the model's vocabulary and the added tokens."""
    ids = [*tokenizer.get_vocab(with_added_tokens=False).values(), *tokenizer.get_added_tokens_decoder()]
    return max(ids, default=-1) + 1


def role_stand_ins(tokenizer: Tokenizer, tokens: Sequence[str]) -> tuple[dict[str, str], str | None]:
    """Roles whose requested default token the model's own tokens replace, and which family's tokens those are."""
    specials = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    for family, stand_ins in ROLE_STAND_INS:
        if set(stand_ins.values()) <= specials:
            chosen = {role: token for role, token in stand_ins.items() if NEVA_TOKEN_ROLES[role] in tokens}
            return chosen, family if chosen else None
    return {}, None


def add_special_tokens(
    tokenizer: Tokenizer, tokens: Sequence[str], source: Path
) -> tuple[dict[str, int], dict[str, int]]:
    """Add each missing token as a special token; returns (added, already present).

    A token that is already a special token is left alone. One that is a normal vocabulary entry or a
    non-special added token is an error: making it special would change how existing texts are tokenised.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab(with_added_tokens=False)
    added_tokens = {token.content: (index, token) for index, token in tokenizer.get_added_tokens_decoder().items()}
    present: dict[str, int] = {}
    missing: list[str] = []
    for token in tokens:
        if token in added_tokens:
            index, existing = added_tokens[token]
            if not existing.special:
                raise NevaError(f"token {token!r} already exists at id {index} of {source} as a non-special added "
                                "token; it cannot be made special. Choose another token name.")
            present[token] = index
        elif token in vocab:
            raise NevaError(f"token {token!r} already exists at id {vocab[token]} of {source} as a normal vocabulary "
                            "token; it cannot be added as a special token. Choose another token name.")
        else:
            missing.append(token)
    first = id_count(tokenizer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
    added = {token: tokenizer.token_to_id(token) for token in missing}
    if list(added.values()) != list(range(first, first + len(missing))):
        raise NevaError(f"{source}: the new tokens got ids {list(added.values())}, not {first} onwards; "
                        "this tokenizer.json has gaps in its ids and cannot be extended safely")
    return added, present


def _output_files(sources: dict[str, bytes], extended: Tokenizer, added: dict[str, int]) -> dict[str, bytes]:
    """The tokenizer files to write: unchanged copies when nothing was added, so a rerun reproduces them."""
    files = dict(sources)
    if HF_CONFIG_FILE not in files:
        files[HF_CONFIG_FILE] = (json.dumps(_GENERIC_CONFIG, indent=2) + "\n").encode()
    if not added:
        return files
    files[HF_TOKENIZER_FILE] = extended.to_str(pretty=True).encode()
    config = json.loads(files[HF_CONFIG_FILE])
    # transformers rebuilds added tokens from this table when it is present: list the new ones too.
    if "added_tokens_decoder" in config:
        for token, index in added.items():
            config["added_tokens_decoder"][str(index)] = {
                "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True,
            }
    files[HF_CONFIG_FILE] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    return files


def _expected_ids(base: Tokenizer, text: str, new_ids: Mapping[str, int]) -> list[int]:
    """The source tokenizer's ids for `text` with each new token's id in its place (what splitting gives)."""
    ids: list[int] = []
    rest = text
    while rest:
        found = [(rest.find(token), token) for token in new_ids if token in rest]
        if not found:
            return ids + base.encode(rest, add_special_tokens=False).ids
        at, token = min(found, key=lambda hit: (hit[0], -len(hit[1])))
        if at:
            ids += base.encode(rest[:at], add_special_tokens=False).ids
        ids.append(new_ids[token])
        rest = rest[at + len(token):]
    return ids


def check_fast_agreement(folder: Path, base: Tokenizer, record: dict[str, Any]) -> None:
    """Load `folder` with transformers and raise unless its ids agree with the record and the source tokenizer."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for a folder it cannot load
        raise NevaError(f"transformers cannot load the extended tokenizer ({type(exc).__name__}: {exc}); "
                        "check the source's tokenizer_config.json") from exc
    if len(hf) != record["vocab_size"]:
        raise NevaError(f"transformers sees {len(hf)} tokens in the extended tokenizer, not {record['vocab_size']}")
    tokens = {**record["already_present"], **record["added"]}
    for token, index in tokens.items():
        if hf.convert_tokens_to_ids(token) != index:
            raise NevaError(f"transformers gives {token!r} the id {hf.convert_tokens_to_ids(token)}, not {index}")
    for text in agreement_probes(list(tokens)):
        expected = _expected_ids(base, text, tokens)
        got = hf(text, add_special_tokens=False).input_ids
        if got != expected:
            raise NevaError(f"the extended tokenizer encodes {text!r} as {got}, expected {expected}: "
                            "the new tokens change how existing text is tokenised, so nothing was written")
