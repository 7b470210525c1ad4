"""The end-of-run summary: each stage, whether it ran or came from the cache, its seconds and its output.

One list of outcomes, two renderings: plain text for the terminal and markdown for the flow run's artifact.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

from neva_core.errors import NevaError


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str  # "ran", "cached", or the final state's name in lower case ("failed", "cancelled", ...)
    seconds: float
    output: str = ""


def status_of(state_name: str) -> str:
    """A Prefect state name as the summary says it: Completed ran, Cached was reused."""
    return {"Completed": "ran", "Cached": "cached"}.get(state_name, state_name.lower())


def _seconds(value: float) -> str:
    return f"{value:.1f}"


def summary_text(outcomes: Sequence[StageOutcome]) -> str:
    """Aligned columns for a terminal, with the totals last."""
    rows = [("stage", "status", "seconds", "output")]
    rows += [(o.stage, o.status, _seconds(o.seconds), o.output) for o in outcomes]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row[:3], widths)), row[3]]).rstrip()
             for row in rows]
    ran = sum(o.status == "ran" for o in outcomes)
    cached = sum(o.status == "cached" for o in outcomes)
    lines.append(f"{len(outcomes)} stages: {ran} ran, {cached} cached, "
                 f"{_seconds(sum(o.seconds for o in outcomes))} s in stages")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_markdown(outcomes: Sequence[StageOutcome], title: str = "Run summary") -> str:
    lines = [f"# {title}", "", "| stage | status | seconds | output |", "|---|---|---:|---|"]
    lines += [f"| {_cell(o.stage)} | {o.status} | {_seconds(o.seconds)} | `{_cell(o.output)}` |"
              if o.output else f"| {_cell(o.stage)} | {o.status} | {_seconds(o.seconds)} | |" for o in outcomes]
    ran = sum(o.status == "ran" for o in outcomes)
    cached = sum(o.status == "cached" for o in outcomes)
    lines += ["", f"{len(outcomes)} stages: {ran} ran, {cached} cached."]
    return "\n".join(lines) + "\n"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_data_uri(png: bytes) -> str:
    """`data:image/png;base64,...`, refusing bytes that are not a PNG (an image artifact would show nothing)."""
    if not png.startswith(_PNG_SIGNATURE):
        raise NevaError("not a PNG file: the image artifact needs PNG bytes (matplotlib: savefig(format='png'))")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
