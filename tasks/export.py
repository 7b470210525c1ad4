"""The export task: a trained NeVA model as an HF LLaVA folder (LlavaForConditionalGeneration + AutoProcessor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from neva_core.io import MANIFEST_NAME, read_manifest, sha256_file, verify_files
from neva_core.llava import export_llava
from neva_core.model.trained import read_trained_config
from tasks.caching import StageCache, check_same_manifest


def export_complete(result: dict[str, Any]) -> None:
    """The export folder is still whole (its manifest's files, by size) and the one this result describes."""
    folder = Path(result["path"])
    verify_files(folder, read_manifest(folder)["files"], check_hash=False)
    check_same_manifest(folder, result["manifest_sha256"], "export")


@task(
    name="export",
    cache_policy=StageCache(stage="export", output_params=("out_dir",), outputs_ok=export_complete),
    persist_result=True,
)
def export_task(trained: Path, out_dir: Path) -> dict[str, Any]:
    """Export the trained-model folder (or a run's OUT) `trained` to the HF LLaVA folder `out_dir`."""
    source, _, _ = read_trained_config(trained)
    path = export_llava(source, out_dir)
    return {"path": str(path), "trained": str(source), "manifest_sha256": sha256_file(Path(path) / MANIFEST_NAME)}
