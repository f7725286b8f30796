"""Workload files (gen --out / --from): written and read back, and bad ones refused."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli.commands import app
from app.engine import NewEvent
from app.workload.generator import WorkloadFileError, read_events, write_events


def test_a_written_workload_reads_back_the_same(tmp_path: Path) -> None:
    events = [NewEvent(1, "a", {"n": 1}), NewEvent(2**53 - 1, "b\u2028", None), NewEvent(1, "c")]
    path = tmp_path / "w.jsonl"
    write_events(path, events)
    assert read_events(path) == events


def test_a_bad_line_is_named_and_nothing_is_sent(tmp_path: Path) -> None:
    """The file, the line and the field; `gen` exits 2 (a usage error) before any push."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"account_id": 1, "event_id": "a"}\n\n{"account_id": "x", "event_id": "b"}\n')
    with pytest.raises(WorkloadFileError, match=r"bad.jsonl:3: account_id: Input should be"):
        read_events(bad)
    done = CliRunner().invoke(app, ["gen", "--from", str(bad)], env={"REDIS_URL": "redis://x:1"})
    assert done.exit_code == 2
    assert "Invalid value for --from" in done.output


@pytest.mark.parametrize(("text", "problem"), [("", "holds no event"), ("[1]", "line")])
def test_empty_or_not_events(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text(text)
    with pytest.raises(WorkloadFileError, match=problem):
        read_events(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WorkloadFileError, match=r"cannot read .*nope\.jsonl: No such file"):
        read_events(tmp_path / "nope.jsonl")
