"""The UMEC benchmarks rewrite their results pages but keep the hand-written reading section."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from umec_common import write_page  # noqa: E402


def test_rewriting_a_page_keeps_its_reading_section(tmp_path: Path):
    page = tmp_path / "umec_overhead.md"
    write_page(page, ["# Title", "", "old table", ""])
    assert page.read_text() == "# Title\n\nold table\n"  # a fresh page has no reading yet
    page.write_text(page.read_text() + "\n## Reading of this run\n\nHand-written.\n\n## Later notes\n\nx\n")
    write_page(page, ["# Title", "", "new table", ""])
    reading = "## Reading of this run\n\nHand-written.\n\n## Later notes\n\nx\n"
    assert page.read_text() == "# Title\n\nnew table\n\n" + reading
    write_page(page, ["# Title", "", "newer table"])
    assert page.read_text() == "# Title\n\nnewer table\n\n" + reading
