"""`neva tokenizer extend`: add NeVA's special tokens to an LLM's tokenizer (see neva_core.tokenizer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from neva_core.tokenizer import NEVA_SPECIAL_TOKENS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenizer",
        help="tokenizer tools: extend an LLM's tokenizer with NeVA's special tokens",
        description="Tokenizer tools.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    extend = actions.add_parser(
        "extend",
        help="append special tokens to a tokenizer.model (sentencepiece) or a tokenizer.json (Qwen2, Llama-3)",
        description=(
            "Append tokens to a sentencepiece model as new pieces (score 0), so their ids start at the old "
            "vocabulary size: on LLaMA-2's tokenizer the default <extra_id_0>..<extra_id_7> get 32000-32007 "
            "and the vocabulary becomes 32008. DIR receives the extended tokenizer.model, tokenizer.json and "
            "tokenizer_config.json (transformers' AutoTokenizer loads DIR and encodes like sentencepiece), "
            "extension.json (added tokens and ids, vocabulary sizes, sha256 of the source) and manifest.json. "
            "Tokens the model already has with the same type are not added again; a token that exists with "
            "another type is an error. A sentencepiece model whose encoding cannot be mirrored exactly (unigram, "
            "an nmt_nfkc normaliser) is extended without Hugging Face files, and the output says so. "
            "A tokenizer.json with no sentencepiece file (Qwen2, Llama-3) gets the tokens as special tokens "
            "appended after its last id; NeVA's roles use the model's own tokens where it has them "
            "(Llama-3: <|reserved_special_token_N|> for <extra_id_N>, as NeMo does; Qwen2-VL's vision tokens "
            "for the image roles). extension.json lists the token of each role under \"roles\". DIR appears only "
            "when complete; running again with the same input and tokens does nothing."
        ),
    )
    extend.add_argument("--in", dest="model", type=Path, required=True, metavar="PATH",
                        help="the tokenizer to extend (it is not modified): a tokenizer.model, a tokenizer.json, "
                             "or a model folder (its tokenizer.model when present, else its tokenizer.json)")
    extend.add_argument("--out", type=Path, required=True, metavar="DIR", help="the new output folder")
    extend.add_argument(
        "--tokens", nargs="+", default=list(NEVA_SPECIAL_TOKENS), metavar="T",
        help="tokens to add, in id order (default: NeVA's <extra_id_0> ... <extra_id_7>)",
    )
    extend.add_argument(
        "--control", action="store_true",
        help="sentencepiece only: add CONTROL pieces (never matched in text, only inserted by id) instead of "
             "USER_DEFINED pieces (matched wherever they appear in text)",
    )
    extend.set_defaults(handler=run_extend)


def run_extend(args: argparse.Namespace) -> int:
    from neva_core.tokenizer import extend_tokenizer

    result = extend_tokenizer(args.model, args.out, args.tokens, "control" if args.control else "user_defined")
    if result.reused:
        print(f"{result.out_dir} already holds this extension (vocab size {result.vocab_size}); nothing written")
        return 0
    for token, index in result.added.items():
        print(f"created token {token} at id {index}")
    for token, index in result.already_present.items():
        print(f"token {token} already present at id {index}")
    if not result.added:
        print("nothing changed: every token was already present")
    for role, token in result.roles.items():
        print(f"role {role}: {token}")
    print(f"vocab size: {result.old_vocab_size} -> {result.vocab_size}")
    if result.hf_files_refused:
        print(f"no Hugging Face files: {result.hf_files_refused}")
    print(f"written: {result.out_dir}")
    return 0
