"""What the UMEC benchmarks share: writing a results page without losing its hand-written reading."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

READING = "## Reading of this run"


def reading_of(path: Path) -> list[str]:
    """The hand-written end of the page at ``path``: from its ``## Reading of this run`` heading on (the
    generated part comes before it), or nothing; a rerun keeps it for its author to revise."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return lines[lines.index(READING) :] if READING in lines else []


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
