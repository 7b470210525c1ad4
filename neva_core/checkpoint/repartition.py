"""Any-to-any tensor-parallel repartition of a native checkpoint, streaming in one pass.

For each tensor name, in canonical order: read that tensor's shard from every input rank file, merge
them into the canonical full tensor (vocab padding trimmed), split it for the new TP size (padding
added) and append the shards to every output rank file. Memory holds one tensor and its shards.
"""

from __future__ import annotations

import logging
from pathlib import Path

from neva_core.checkpoint.layout import NativeCheckpoint, NativeReader, Provenance, save_native

log = logging.getLogger(__name__)


def repartition(in_dir: Path | str, out_dir: Path | str, tp: int) -> NativeCheckpoint:
    """Rewrite the native checkpoint `in_dir` for tensor-parallel size `tp` into `out_dir`.

    The input is verified against its manifest (sizes and headers up front, sha256 while it is read,
    before the output is published). Raises NevaError naming every factor that `tp` does not divide.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    with NativeReader(in_dir, deep=True) as reader:
        config = reader.config.with_tp(tp)
        parent = {"path": str(in_dir.resolve()), "manifest_sha256": reader.manifest_sha256(), "tp": reader.tp}
        inherited = reader.provenance
        provenance = Provenance(
            source=inherited.source,
            original_vocab_size=inherited.original_vocab_size,
            hf_config=inherited.hf_config,
            history=(*inherited.history, {"stage": "repartition", "from_tp": reader.tp, "tp": tp}),
            parent=parent,
        )
        log.info("repartitioning %s (tp=%d) -> %s (tp=%d)", in_dir, reader.tp, out_dir, tp)
        return save_native(
            out_dir, config, tp=tp, dtype=reader.dtype, provenance=provenance, tensors=reader.full_tensors(),
            wanted={"tp": tp, "parent.manifest_sha256": parent["manifest_sha256"]},
        )
