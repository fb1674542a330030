"""docs/configuration.md is written from the settings' declarations, and kept in step with them."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.config.reference import render
from proxy.config.settings import DOCUMENTED_VARIABLES

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_the_committed_reference_is_what_the_declarations_render() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: run make docs"
    )


def test_every_documented_variable_has_a_row_with_its_default() -> None:
    rows = {
        name: line
        for line in render().splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split(" | ")[0])
    }
    for doc in DOCUMENTED_VARIABLES:
        for name in re.split(r", | / ", doc.names):
            assert name in rows, f"{name} has no row in docs/configuration.md"
            default = re.sub(r"[`\\]", "", rows[name].split(" | ")[1])  # code marks, escapes
            assert doc.default in default, (name, default)


def test_test_only_variables_are_listed_apart() -> None:
    text = render()
    tests_section = text[text.index("## For tests and benchmarks only") :]
    for doc in DOCUMENTED_VARIABLES:
        assert (f"`{doc.names}`" in tests_section) == doc.names.startswith("FAL_PROXY_TEST_")


def test_markup_in_meanings_is_escaped_or_in_code() -> None:
    text = render()
    assert "`Authorization: Key <key>`" in text  # a quoted value becomes code, kept as written
    assert "&lt;origin&gt;" in text  # an angle bracket outside code is not taken for HTML
    assert "fal-ai/flux/\\*" in text  # nor a star for emphasis
