"""What the UMEC benchmarks share: writing a results page without losing its hand-written reading."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

READING = "## Reading of this run"


def reading_of(path: Path) -> list[str]:
    """The hand-written ``## Reading of this run`` section of the page at ``path`` (up to the next
    second-level heading), or nothing: a rerun keeps it for its author to revise."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    if READING not in lines:
        return []
    start = lines.index(READING)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def write_page(path: Path, lines: Sequence[str]) -> None:
    """Write the generated ``lines`` to ``path``, followed by the page's existing reading section."""
    kept = reading_of(path)
    text = "\n".join([*lines, *([""] if lines and lines[-1] and kept else []), *kept]).rstrip("\n") + "\n"
    path.write_text(text)


def conditions() -> dict[str, object]:
    """When and under what load a measurement ran (1/5/15-minute load averages of this host)."""
    return {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
