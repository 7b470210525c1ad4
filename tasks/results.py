"""Tasks hand small JSON values to the next stage: paths and manifest summaries, never data."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def to_json(value: Any) -> Any:
    """A dataclass result (with Paths, tuples) as plain JSON types, for Prefect's result store and UI."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
