"""`neva download SOURCE DEST`: fetch a Hub file or snapshot, a URL or a local file, verified and resumable."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Download SOURCE into the folder DEST. A single file lands at DEST/<basename>; a snapshot keeps the
repo's paths under DEST and writes DEST/manifest.json last. Every file is verified (size and sha256:
the Hub's published LFS sha256 or git blob id, or --sha256) before it is renamed into place. An
interrupted download resumes where it stopped; a rerun over a complete copy transfers nothing.

SOURCE forms:
  hf://datasets/<org>/<name>/<path/in/repo>[@revision]   one dataset file
  hf://datasets/<org>/<name>[@revision]                  dataset snapshot (filter with --include)
  hf://<org>/<name>[@revision]                           model snapshot (filter with --include)
  hf://<org>/<name>/<path/in/repo>[@revision]            one model file
  https://... or http://...                              one file
  /local/path, file:///local/path                        a file, or a folder copied as a snapshot
"""

EPILOG = """\
The Hub token is read from the HF_TOKEN environment variable (never from the command line, where
other users could see it) and is sent only to the Hub endpoint. Gated repos such as
meta-llama/Llama-2-7b-chat-hf need their licence accepted on the Hub page first.

examples:
  neva download hf://datasets/liuhaotian/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json data/
  neva download hf://lmsys/vicuna-7b-v1.5 ckpt/vicuna --include '*.safetensors' --include 'config.json' \\
      --include 'tokenizer.model'
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("download", help="download a Hub file or snapshot, a URL or a local file",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="what to download (forms above)")
    p.add_argument("dest", metavar="DEST", help="destination folder (created if missing)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="snapshot only: keep repo paths matching this fnmatch pattern (e.g. '*.safetensors'); "
                        "repeatable; without it the whole repo is fetched. 'A|B' keeps the files of the first "
                        "alternative that matches any, and fails when none does: '*.safetensors|pytorch_model*.bin' "
                        "takes the safetensors weights when the repo has them, else the .bin ones")
    p.add_argument("--sha256", metavar="HEX", help="single file only: the expected sha256; a mismatch deletes "
                                                    "the download and fails")
    p.add_argument("--endpoint", metavar="URL", help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--max-retries", type=int, default=5, metavar="N",
                   help="retries of a transient failure (connection drop, timeout, 429, 5xx) with exponential "
                        "backoff; 401/403/404 fail at once (default: 5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a summary")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neva_core.data.download import download

    result = download(args.source, args.dest, include=args.include, sha256=args.sha256, endpoint=args.endpoint,
                      max_retries=args.max_retries)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    commit = f" at commit {result.commit}" if result.commit else ""
    print(f"{result.source}{commit}: {len(result.files)} file(s), {result.total_bytes} bytes in {result.dest} "
          f"({result.transferred_bytes} bytes transferred)")
    if result.manifest:
        print(f"manifest: {result.manifest}")
    return 0
