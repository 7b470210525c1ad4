"""Extend an LLM's tokenizer with NeVA's special tokens, and write Hugging Face files that agree with it.

Two kinds of tokenizer are handled: a sentencepiece `tokenizer.model` (LLaMA-2, Mistral, Vicuna), here, and
a Hugging Face `tokenizer.json` with no sentencepiece file (Qwen2, Llama-3: byte-level BPE), in
`neva_core.tokenizer_fast`. `extend_tokenizer` picks the kind from the file or folder it is given.

For sentencepiece models, NeMo's recipe appends `<extra_id_0>` ... `<extra_id_7>` to the LLM's
`ModelProto`, so the new ids start at the old vocabulary size (LLaMA-2: 32000-32007, vocab 32008). The
proto is edited through the `sentencepiece_model_pb2` module the sentencepiece wheel ships; nothing is
built from source.

The output folder also holds `tokenizer.json` and `tokenizer_config.json` so that
`transformers.AutoTokenizer.from_pretrained(DIR)` encodes every text to the same ids as sentencepiece, with
one documented exception (a text that is exactly one added token, see `_dummy_prefix_pattern`). A model
whose encoding no `tokenizers` pipeline here reproduces (a unigram model, an nmt_nfkc normaliser) is still
extended, as NeMo's script does; only its Hugging Face files are left out, and the result says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from neva_core.errors import NevaError
from neva_core.io import (
    atomic_file,
    commit_output,
    file_entry,
    read_own_manifest,
    verify_files,
    write_json_atomic,
    write_manifest,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

NEVA_SPECIAL_TOKENS: tuple[str, ...] = tuple(f"<extra_id_{i}>" for i in range(8))

# What NeMo's NeVA templates use each extra id for.
NEVA_TOKEN_ROLES: Mapping[str, str] = MappingProxyType({
    "system": "<extra_id_0>",
    "separator": "<extra_id_1>",
    "labels": "<extra_id_2>",
    "image_patch": "<extra_id_3>",
    "image_start": "<extra_id_4>",
    "image_end": "<extra_id_5>",
    "bos": "<extra_id_6>",  # replaced by the real BOS id after tokenising (llama_2 template)
    "eos": "<extra_id_7>",  # replaced by the real EOS id after tokenising
})

TokenizerKind = Literal["sentencepiece", "hf-fast"]
SENTENCEPIECE: TokenizerKind = "sentencepiece"
HF_FAST: TokenizerKind = "hf-fast"

PieceKind = Literal["user_defined", "control"]
_Piece = sp_pb2.ModelProto.SentencePiece
PIECE_TYPES: Mapping[str, int] = MappingProxyType({"user_defined": _Piece.USER_DEFINED, "control": _Piece.CONTROL})

MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
EXTENSION_FILE = "extension.json"
STAGE = "tokenizer"  # the manifest's stage name
_SPACE = "\u2581"  # sentencepiece's visible space


@dataclass(frozen=True)
class TokenizerExtension:
    out_dir: Path
    added: dict[str, int]  # token -> new id, in id order
    already_present: dict[str, int]  # tokens the source already had and the extension uses, with their ids
    vocab_size: int
    old_vocab_size: int
    reused: bool = False  # True when out_dir already held this extension and nothing was written
    kind: TokenizerKind = SENTENCEPIECE
    roles: dict[str, str] = field(default_factory=dict)  # NeVA role -> the token that plays it
    hf_files_refused: str | None = None  # why a sentencepiece model got no Hugging Face files (None: it got them)

    @property
    def tokenizer_model(self) -> Path:
        return self.out_dir / MODEL_FILE

    @property
    def tokenizer_file(self) -> Path:
        """The file the extension is read from: tokenizer.model (sentencepiece) or tokenizer.json."""
        return self.out_dir / (MODEL_FILE if self.kind == SENTENCEPIECE else HF_TOKENIZER_FILE)


class HFMismatch(NevaError):
    """No Hugging Face tokenizer built here encodes exactly like this sentencepiece model."""


def piece_type_name(piece_type: int) -> str:
    return _Piece.Type.Name(piece_type)


def read_model_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise NevaError(f"the sentencepiece model {path} does not exist; pass the path of a tokenizer.model") from exc
    except OSError as exc:
        raise NevaError(f"cannot read the sentencepiece model {path}: {exc.strerror}") from exc


def load_model_proto(path: Path) -> sp_pb2.ModelProto:
    """Parse a sentencepiece model file, or raise a NevaError naming it."""
    return parse_model_proto(read_model_bytes(path), path)


def parse_model_proto(data: bytes, path: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises its own DecodeError, which names no file
        raise NevaError(f"{path} is not a sentencepiece model ({exc}); pass the tokenizer.model file") from exc
    if not proto.pieces:
        raise NevaError(f"{path} is not a sentencepiece model (it has no pieces); pass the tokenizer.model file")
    return proto


def find_tokenizer(folder: Path) -> Path:
    """The tokenizer file of a model snapshot: tokenizer.model when present (sentencepiece), else tokenizer.json."""
    for name in (MODEL_FILE, HF_TOKENIZER_FILE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise NevaError(
        f"{folder} has neither {MODEL_FILE} (sentencepiece) nor {HF_TOKENIZER_FILE} (a Hugging Face fast "
        "tokenizer); download the LLM with its tokenizer files (include them in the download patterns)"
    )


def default_roles(tokens: Sequence[str] | set[str]) -> dict[str, str]:
    """NeVA's roles whose default token (`NEVA_TOKEN_ROLES`) is among `tokens`."""
    return {role: token for role, token in NEVA_TOKEN_ROLES.items() if token in tokens}


def validate_tokens(tokens: Sequence[str]) -> None:
    if not tokens:
        raise NevaError("no tokens to add: pass at least one token")
    seen: set[str] = set()
    for token in tokens:
        if not token or any(ch.isspace() for ch in token):
            # sentencepiece turns spaces into '▁' before matching pieces, so such a piece could never be produced
            raise NevaError(f"token {token!r} is empty or contains whitespace; sentencepiece could never produce it")
        if token in seen:
            raise NevaError(f"token {token!r} is listed twice")
        seen.add(token)


def add_pieces(
    proto: sp_pb2.ModelProto, tokens: Sequence[str], piece_type: int
) -> tuple[dict[str, int], dict[str, int]]:
    """Append each missing token as a piece of `piece_type` (score 0.0); returns (added, already present).

    A token that exists with the same type is left alone; one that exists with another type is an error,
    since re-typing it would change how every existing text is tokenised.
    """
    existing = {piece.piece: (index, piece.type) for index, piece in enumerate(proto.pieces)}
    added: dict[str, int] = {}
    present: dict[str, int] = {}
    for token in tokens:
        if token in existing:
            index, existing_type = existing[token]
            if existing_type != piece_type:
                raise NevaError(
                    f"token {token!r} already exists at id {index} as a {piece_type_name(existing_type)} piece; "
                    f"it cannot be added as {piece_type_name(piece_type)}. Choose another token name."
                )
            present[token] = index
            continue
        proto.pieces.add(piece=token, score=0.0, type=piece_type)
        added[token] = len(proto.pieces) - 1
    return added, present


def extend_tokenizer(
    source: Path,
    out_dir: Path,
    tokens: Sequence[str] = NEVA_SPECIAL_TOKENS,
    piece_type: PieceKind = "user_defined",
) -> TokenizerExtension:
    """Write `out_dir` with the extended tokenizer, Hugging Face tokenizer files and `extension.json`.

    `source` is a sentencepiece `tokenizer.model`, a `tokenizer.json`, or a model folder (its tokenizer.model
    when present, else its tokenizer.json). Running it again with the same source and request returns the
    recorded result and writes nothing.
    """
    source = Path(source)
    if source.is_dir():
        source = find_tokenizer(source)
    if source.suffix == ".json":
        from neva_core.tokenizer_fast import extend_fast_tokenizer

        return extend_fast_tokenizer(source, Path(out_dir), tokens, piece_type)
    return extend_sentencepiece(source, Path(out_dir), tokens, piece_type)


def extend_sentencepiece(
    model_path: Path, out_dir: Path, tokens: Sequence[str], piece_type: PieceKind
) -> TokenizerExtension:
    """The sentencepiece kind: new pieces appended to the ModelProto, and HF files that encode like it."""
    if piece_type not in PIECE_TYPES:
        raise NevaError(f"piece type {piece_type!r} is not one of {', '.join(PIECE_TYPES)}")
    validate_tokens(tokens)
    source_bytes = read_model_bytes(model_path)
    source_sha256 = hashlib.sha256(source_bytes).hexdigest()
    request = {"tokens": list(tokens), "piece_type": piece_type}
    proto = parse_model_proto(source_bytes, model_path)
    old_vocab_size = len(proto.pieces)
    added, present = add_pieces(proto, tokens, PIECE_TYPES[piece_type])
    # Unchanged models are copied byte for byte, so a rerun on an extended model reproduces it exactly.
    model_bytes = proto.SerializeToString() if added else source_bytes
    hf_tokenizer, refusal = None, None
    try:
        hf_tokenizer = build_hf_tokenizer(proto, model_path)
        check_agreement(model_bytes, hf_tokenizer, list(tokens))
    except HFMismatch as exc:
        refusal = f"{exc}; the extended {MODEL_FILE} is written without {HF_TOKENIZER_FILE}/{HF_CONFIG_FILE}"
        log.warning("%s", refusal)
    record = {
        "request": request,
        "source": {"sha256": source_sha256, "vocab_size": old_vocab_size},
        "kind": SENTENCEPIECE,
        "added": added,
        "already_present": present,
        "vocab_size": len(proto.pieces),
        "roles": default_roles({piece.piece for piece in proto.pieces}),
        "hf_files_refused": refusal,
    }

    def write(tmp: Path) -> TokenizerExtension:
        with atomic_file(tmp / MODEL_FILE) as f:
            f.write(model_bytes)
        names = [MODEL_FILE, EXTENSION_FILE]
        if hf_tokenizer is not None:
            write_hf_files(proto, hf_tokenizer, tmp)
            names += [HF_TOKENIZER_FILE, HF_CONFIG_FILE]
        write_json_atomic(tmp / EXTENSION_FILE, record)
        write_manifest(tmp, {"stage": STAGE, "files": {name: file_entry(tmp / name) for name in sorted(names)}})
        return _extension_from_record(out_dir, record)

    return commit_output(out_dir, reuse=lambda found: _reuse_existing(found, source_sha256, request), build=write)


def _reuse_existing(out_dir: Path, source_sha256: str, request: dict[str, Any]) -> TokenizerExtension | None:
    """The extension at `out_dir` if it was made from the same model and request; None if from others or
    damaged (it is then rebuilt); an error if the folder is no extended tokenizer (never replaced)."""
    manifest = read_own_manifest(out_dir, "an extended tokenizer", "stage", STAGE)
    try:
        verify_files(out_dir, manifest["files"])
    except NevaError as exc:
        log.warning("%s; extending again", exc)
        return None
    record = json.loads((out_dir / EXTENSION_FILE).read_text())
    if record["source"]["sha256"] != source_sha256 or record["request"] != request:
        log.info("%s holds a tokenizer extended from another model or with other tokens; extending again", out_dir)
        return None
    log.info("%s is already complete for this request; nothing written", out_dir)
    return _extension_from_record(out_dir, record, reused=True)


def _extension_from_record(out_dir: Path, record: dict[str, Any], *, reused: bool = False) -> TokenizerExtension:
    return TokenizerExtension(
        out_dir=out_dir,
        added=dict(record["added"]),
        already_present=dict(record["already_present"]),
        vocab_size=record["vocab_size"],
        old_vocab_size=record["source"]["vocab_size"],
        reused=reused,
        kind=record.get("kind", SENTENCEPIECE),
        roles=dict(record.get("roles", {})),
        hf_files_refused=record.get("hf_files_refused"),
    )


# ---------------------------------------------------------------------------------------------------------
# Hugging Face files


def _check_hf_compatible(proto: sp_pb2.ModelProto, source: Path) -> None:
    """Raise unless the model's encoding can be reproduced exactly by a `tokenizers` BPE pipeline."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    supported = "only LLaMA-style models (BPE, identity normaliser, spaces kept) get matching Hugging Face files"
    if spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise HFMismatch(f"{source} is a {sp_pb2.TrainerSpec.ModelType.Name(spec.model_type)} model; {supported}")
    if norm.precompiled_charsmap or norm.name not in ("", "identity"):
        raise HFMismatch(f"{source} normalises text with {norm.name!r}; {supported}")
    if norm.remove_extra_whitespaces:
        raise HFMismatch(f"{source} removes extra whitespace; {supported}")


def _bpe_merges(proto: sp_pb2.ModelProto) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, ranked like sentencepiece ranks merges.

    sentencepiece's BPE merges the adjacent pair whose joined piece has the highest score, so a merge's rank
    is its joined piece's score (ties: lower id first).
    """
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _Piece.NORMAL}
    ranked = []
    for piece, index in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append(((-proto.pieces[index].score, index, normal[left], normal[right]), (left, right)))
    ranked.sort()
    return [pair for _, pair in ranked]


def _dummy_prefix_pattern(user_defined: Sequence[str]) -> str:
    r"""The regex at which the dummy '▁' is inserted: the start of the text, unless the text IS one added token.

    sentencepiece prefixes the whole text with '▁', so "<extra_id_4>a" encodes as [▁, <extra_id_4>, a].
    `tokenizers` also runs the normaliser over each added token's own text to build its matcher; an
    unconditional prefix would make that pattern "▁<extra_id_4>", which never matches inside a text. The
    lookahead keeps the token's own text unchanged. The price: a text that is exactly one added token
    encodes as [token] here, [▁, token] in sentencepiece.
    """
    if not user_defined:
        return r"\A"
    alternatives = "|".join(re.escape(token) for token in user_defined)
    return rf"\A(?!(?:{alternatives})\z)"


def build_hf_tokenizer(proto: sp_pb2.ModelProto, source: Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes like the sentencepiece model `proto` (read from `source`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    _check_hf_compatible(proto, source)
    spec = proto.trainer_spec
    pieces = proto.pieces
    tokenizer = Tokenizer(
        BPE(
            vocab={p.piece: i for i, p in enumerate(pieces)},
            merges=_bpe_merges(proto),
            unk_token=pieces[spec.unk_id].piece,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    )
    user_defined = [p.piece for p in pieces if p.type == _Piece.USER_DEFINED]
    steps = [normalizers.Replace(" ", _SPACE)]
    decode_steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Replace(Regex(_dummy_prefix_pattern(user_defined)), _SPACE))
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(decode_steps)
    # Control and unknown pieces are special: sentencepiece never produces them from text. User-defined pieces
    # are matched in text after normalisation, like sentencepiece matches them.
    special_types = (_Piece.CONTROL, _Piece.UNKNOWN)
    tokenizer.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in special_types]
    )
    tokenizer.add_tokens([AddedToken(piece, special=False, normalized=True) for piece in user_defined])
    if spec.bos_id >= 0:
        bos = pieces[spec.bos_id].piece
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spec.bos_id)]
        )
    # sentencepiece never matches control pieces such as "<s>" inside a text; neither does this tokenizer.
    tokenizer.encode_special_tokens = True
    return tokenizer


def hf_tokenizer_config(proto: sp_pb2.ModelProto) -> dict[str, Any]:
    """tokenizer_config.json: the generic fast class, so transformers uses tokenizer.json as written."""
    spec = proto.trainer_spec
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": spec.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # Text is text: "<s>" typed in a prompt is not BOS, as in sentencepiece. Special ids are inserted by id.
        "split_special_tokens": True,
    }
    for role, index in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id), ("unk_token", spec.unk_id),
                        ("pad_token", spec.pad_id)):
        if index >= 0:
            config[role] = proto.pieces[index].piece
    return config


def write_hf_files(proto: sp_pb2.ModelProto, hf_tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for `proto` into `out_dir` (through temp names)."""
    with atomic_file(out_dir / HF_TOKENIZER_FILE, "w") as f:
        f.write(hf_tokenizer.to_str(pretty=True))
    write_json_atomic(out_dir / HF_CONFIG_FILE, hf_tokenizer_config(proto))


def write_hf_tokenizer_files(model_path: Path, out_dir: Path) -> None:
    """Hugging Face tokenizer files for an existing sentencepiece model (e.g. beside a checkpoint)."""
    model_bytes = read_model_bytes(model_path)
    proto = parse_model_proto(model_bytes, model_path)
    hf_tokenizer = build_hf_tokenizer(proto, model_path)
    check_agreement(model_bytes, hf_tokenizer, [p.piece for p in proto.pieces if p.type == _Piece.USER_DEFINED])
    write_hf_files(proto, hf_tokenizer, out_dir)


def agreement_probes(tokens: Sequence[str]) -> list[str]:
    """Texts on which sentencepiece and the Hugging Face files must agree: plain text, and each token in context."""
    probes = ["a red circle.\nDescribe the image concisely.", "  two leading spaces", "tab\tand  gaps ", ""]
    for token in tokens:
        probes += [f"hello {token} world", f"{token}a red circle", f"x{token}y", f"{token}{token}\n"]
    return probes


def check_agreement(model_bytes: bytes, hf_tokenizer: Tokenizer, tokens: Sequence[str]) -> None:
    """Raise if the Hugging Face tokenizer encodes any probe text differently from sentencepiece."""
    processor = SentencePieceProcessor(model_proto=model_bytes)
    for text in agreement_probes(tokens):
        expected = processor.encode(text)
        got = hf_tokenizer.encode(text, add_special_tokens=False).ids
        if got != expected:
            raise HFMismatch(
                f"the Hugging Face tokenizer built for this model encodes {text!r} as {got}, sentencepiece as "
                f"{expected}: this sentencepiece model cannot be mirrored exactly"
            )
