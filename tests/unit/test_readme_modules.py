"""The README's "Design notes" table names every module of proxy/ (its one job)."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_every_module_has_a_row_in_the_design_notes() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    notes = readme[readme.index("## Design notes") :]
    named = {
        name
        for line in notes.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([a-z_]+)/?`", line.split("|")[1])
    }
    modules = {
        path.stem
        for path in (ROOT / "proxy").glob("*.py")
        if path.stem not in ("__init__", "__main__")
    }
    assert len(modules) > 30  # the glob found the package
    assert modules - named == set(), "modules without a row in README's Design notes"
