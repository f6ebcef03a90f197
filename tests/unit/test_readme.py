"""The README's settings reference is the one the code generates, so it cannot drift."""

from __future__ import annotations

from pathlib import Path

from metering.commands.config import reference
from metering.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_carries_the_generated_settings_reference() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-reference:start -->") + len(
        "<!-- settings-reference:start -->"
    )
    end = text.index("<!-- settings-reference:end -->")
    assert text[start:end].strip() == reference().strip(), (
        "README settings table is stale: run `metering config --reference` and paste it in"
    )


def test_every_setting_is_described() -> None:
    undescribed = [n.upper() for n, f in Settings.model_fields.items() if not f.description]
    assert undescribed == []


def test_the_readme_names_the_two_newcomer_commands_that_ci_runs() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
