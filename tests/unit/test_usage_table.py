"""The usage CLI's tables print what tenants sent: their dimension values may hold any
characters, and must reach the operator's terminal as text, not as control sequences."""

from __future__ import annotations

from metering.commands.usage import render_table
from metering.ids import printable


def test_a_dimension_value_with_control_characters_cannot_forge_a_row_or_escape() -> None:
    """The security audit's value: erase the line, return, print a forged row, set the window
    title. Before the fix, the table had three lines of data for two rows."""
    forged = "eu\x1b[2K\r\n2026-12-08T00:00:00Z  us  \x1b]0;pwned\x07\u009b"
    table = render_table(
        ["window_start", "region", "sum"], [["2026-12-08T00:00:00Z", forged, 5.0], ["x", "us", 2]]
    )
    lines = table.split("\n")
    assert len(lines) == 4  # header, rule, two rows
    assert all(c.isprintable() for line in lines for c in line)
    assert "\\x1b[2K\\r\\n" in lines[2] and "\\x07\\x9b" in lines[2]


def test_printable_keeps_printable_text_as_it_is() -> None:
    text = "Zürich eu-west-1 ✓ a b"
    assert printable(text) is text
    assert printable("a\tb\x00") == "a\\tb\\x00"
