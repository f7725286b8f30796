"""`evq --help` is written for the user: what evq is, where settings come from, where to start."""

import re

from typer.testing import CliRunner

from app.cli import app


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def test_help_says_what_evq_is_and_where_settings_come_from() -> None:
    """The first screen names the product, the settings' sources and the first command."""
    text = help_text()
    assert "per-account ordered event processing on Redis" in text
    assert ".env.example" in text
    assert "make demo" in text
    assert "parses, then calls" not in text


def test_command_help_lines_do_not_break_mid_sentence() -> None:
    """On a wide terminal every command's summary is one line: a docstring's hard line breaks
    do not reach the user."""
    rows = [line.strip("│ ").rstrip(" │") for line in help_text().splitlines() if "│" in line]
    commands = [row for row in rows if re.match(r"^[a-z]+ {2,}\S", row)]
    continued = [row for row in rows if row and row not in commands and not row.startswith("-")]
    assert len(commands) >= 10
    assert continued == []
